"""Ray start-up and the pieces of Ray Data wiring that every job shares, written once."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import socket
from typing import Any

import pyarrow as pa
import ray
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from sdm.data.card import ShardInfo
from sdm.data.shards import BASE_SCHEMA, read_shard_table
from sdm.errors import ShardIntegrityError
from sdm.process_env import set_allocator_env


def init_ray(address: str | None, num_cpus: int | None = None, dashboard: bool = False) -> None:
    """Join the given cluster or the job's (RAY_ADDRESS), else start a private local one: never a cluster that
    merely happens to run on this machine (`--address auto` asks for that). A local one gets `num_cpus` logical
    CPUs when given, and its dashboard when asked (Ray Train's placement-group cleaner polls the state API the
    dashboard serves, and warns every second without it)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    # A new local cluster gets Ray's default, token authentication, and Ray warns that it chose it (and says where it
    # saved a new token): that choice is ours to keep, not news. Ray's other start-up lines go to its logs; the one
    # line below says what started.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    options: dict = {"num_cpus": num_cpus} if num_cpus else {}
    if dashboard:
        # Ray's actors that call the state API find its server by RAY_API_SERVER_ADDRESS; without it they look for
        # "the" cluster on the machine, and fail (with a traceback every second) when another one runs there too.
        port = _free_port()
        options.update(dashboard_port=port, runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})
    set_allocator_env()  # a cluster of our own: its workers start with it (a joined cluster's nodes set their own)
    context = ray.init(address="local", include_dashboard=dashboard, logging_level=logging.WARNING, **options)
    cpus = int(ray.cluster_resources().get("CPU", 0))
    where = f"; dashboard http://{context.dashboard_url}" if context.dashboard_url else ""
    print(f"started a local Ray cluster ({cpus} CPUs{where}); its logs: {context.address_info['session_dir']}/logs", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_concurrency(text: str) -> int | tuple[int, int]:
    """`N` actors, or `MIN-MAX` for an autoscaling pool (an argparse type)."""
    lo, _, hi = text.partition("-")
    try:
        sizes = (int(lo), int(hi or lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN-MAX, got {text!r}") from None
    if not 1 <= sizes[0] <= sizes[1]:
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= MAX, got {text!r}")
    return sizes[0] if sizes[0] == sizes[1] else sizes


def actor_pool(concurrency: int | tuple[int, int]) -> ray.data.ActorPoolStrategy:
    if isinstance(concurrency, tuple):
        return ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1])
    return ray.data.ActorPoolStrategy(size=concurrency)


def _read_shard(root_uri: str, shard: ShardInfo, columns: list[str] | None, reject_column: str | None,
                verify: bool) -> list[pa.Table]:
    """One read task's work: the shard's bytes read once, checked against the card and parsed from memory."""
    if reject_column is None:
        return [read_shard_table(root_uri, shard, verify, columns)]
    try:
        table = read_shard_table(root_uri, shard, verify, columns)
    except ShardIntegrityError as e:  # one row in the shard's place: its key is the shard, the reason its error
        schema = pa.schema([BASE_SCHEMA.field(c) for c in columns or BASE_SCHEMA.names])
        row = {c: None for c in schema.names} | {"key": shard.path, "split": shard.split}
        return [pa.Table.from_pylist([row], schema=schema).append_column(reject_column, pa.array([str(e)]))]
    return [table.append_column(reject_column, pa.array([""] * table.num_rows, pa.string()))]


class CardShards(Datasource):
    """A dataset's shards as its card lists them, one read task per shard, in the order given. Each task reads its
    shard's bytes once, checks their size and sha256 against the card (sdm.data.shards.read_shard_table, the
    single-process reader's check) and parses the same bytes: no extra pass over the data, and never a shard the
    card does not vouch for. Tasks, not actors: Ray Data's DataSource V2 Parquet reader starts a pool of
    footer-reading actors for every read, each a new Python process, seconds of CPU on a small node taken from the
    sampling actor or the training workers while they start (bench/generate_throughput.py)."""

    def __init__(self, root_uri: str, shards: list[ShardInfo], columns: list[str] | None, reject_column: str | None,
                 verify: bool = True):
        super().__init__()
        self.root, self.shards, self.columns, self.reject_column, self.verify = root_uri, shards, columns, reject_column, verify

    def estimate_inmemory_data_size(self) -> int:
        return sum(s.bytes for s in self.shards)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None) -> list[ReadTask]:
        return [
            ReadTask(functools.partial(_read_shard, self.root, s, self.columns, self.reject_column, self.verify),
                     BlockMetadata(num_rows=s.rows, size_bytes=s.bytes, exec_stats=None, input_files=[s.path]),
                     per_task_row_limit=per_task_row_limit)
            for s in self.shards
        ]


def read_shards(root_uri: str, shards: list[ShardInfo], columns: list[str] | None = None,
                reject_column: str | None = None, verify: bool = True) -> ray.data.Dataset:
    """The rows of `shards` (of the dataset at `root_uri`), each shard checked against the card as it is read. A
    shard that fails raises ShardIntegrityError naming it and the card; with `reject_column`, it becomes instead one
    row (key: the shard's path) whose `reject_column` holds that error, and every other row has "" there.
    `verify=False` skips the check (bench/read_integrity.py measures its cost); the jobs never pass it."""
    return ray.data.read_datasource(CardShards(root_uri, shards, columns, reject_column, verify))


def integrity_failure(e: BaseException) -> ShardIntegrityError | None:
    """The ShardIntegrityError behind an error raised through Ray (a read task's RayTaskError, Ray Train's
    WorkerGroupError around a worker's), so that the job names the shard in one line; None for any other error."""
    seen, todo = set(), [e]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        cause = getattr(err, "cause", None)  # a RayTaskError's original exception
        if isinstance(err, ShardIntegrityError) and not isinstance(cause, ShardIntegrityError):
            return err
        todo += [cause, err.__cause__, err.__context__, *getattr(err, "worker_failures", {}).values()]
    return None
