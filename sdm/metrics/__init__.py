"""Quality measurements of generated datasets: Frechet distances, diversity, mIoU, and the report.

A metric computed with a randomly initialised backbone is named for what it is (e.g. "random-alexnet
distance"), never FID or LPIPS.
"""
