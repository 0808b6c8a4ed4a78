"""Ray programs. Imported before any of them imports Ray, so the settings below reach Ray Data in this process and
in every process of a local cluster it starts."""

import os

os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", os.path.join(os.path.dirname(os.path.abspath(__file__)), "ray_data_logging.yaml"))
