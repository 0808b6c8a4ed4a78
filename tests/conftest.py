import os
import sys

import numpy as np
import pytest
import torch

from sdm.data.toy import render_toy_image, write_toy_dataset
from sdm.testing import write_painted_generation

from sdm.config import ModelConfig, get_preset
from sdm.diffusion import GaussianDiffusion
from sdm.training import make_optimizer, to_memory_format, train_step
from sdm.unet import SDMUNet


def perturbed(net: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Randomly perturb every parameter so zero-initialised layers pass signal (a randomly initialised model)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return net


@pytest.fixture
def tiny_cfg():
    return get_preset("tiny")


@pytest.fixture
def random_tiny_net(tiny_cfg) -> SDMUNet:
    torch.manual_seed(0)
    return perturbed(SDMUNet(tiny_cfg.model)).eval()


@pytest.fixture
def one_thread():
    """One torch thread, as each Ray Train worker runs on one CPU (and quick for small shapes on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_losses(cfg, batches: list, channels_last: bool, steps: int, device: str = "cpu",
                 dtype: torch.dtype | None = None) -> tuple[list[float], SDMUNet]:
    """Per-step losses and the network after `steps` train steps from one seed, on the same draws."""
    torch.manual_seed(0)
    net = SDMUNet(cfg.model).to(device).train()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = make_optimizer(net, 1e-3, 0.0)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion, cfg.model.learn_sigma)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(steps):
        x0, label = to_memory_format(*(b.to(device) for b in batches[step % len(batches)]), channels_last)
        losses.append(train_step(net, opt, diffusion, [(x0, label)], cfg, 0.0, gen, dtype).loss)
    return losses, net


def reduced(model: ModelConfig) -> ModelConfig:
    """A preset's structure at reduced width."""
    import dataclasses

    return dataclasses.replace(model, model_channels=32, num_head_channels=32, spade_hidden=16, norm_groups=8)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The standard AWS variables pointing at the loopback server, and a fresh bucket; yields its s3:// URI."""
    import uuid

    import boto3

    for k, v in {
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(k, v)
    bucket = f"b{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    return f"s3://{bucket}"


@pytest.fixture(scope="session")
def s3_proxy(s3_server):
    """A fault-injecting proxy in front of the loopback S3 server (tests/s3_faults.py); faults are set by tests."""
    from s3_faults import FaultProxy

    proxy = FaultProxy(s3_server)
    yield proxy
    proxy.close()


@pytest.fixture
def faulty_s3(s3_env, s3_proxy, monkeypatch):
    """s3_env's fresh bucket, reached through s3_proxy (AWS_ENDPOINT_URL points at it), with no fault pending,
    its counters at zero, and the library's default number of attempts; yields the bucket's s3:// URI."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_proxy.url)
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    s3_proxy.reset()
    yield s3_env
    s3_proxy.up()


@pytest.fixture(scope="session")
def random_model(tmp_path_factory) -> str:
    """A randomly initialised tiny-preset model (perturbed, never trained), saved like an exported one."""
    from sdm.testing import save_random_model

    uri = str(tmp_path_factory.mktemp("model") / "random-tiny")
    save_random_model(uri, "tiny", seed=0)
    return uri


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """A base URI on local files, then on the loopback S3 endpoint."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_env") + "/store"


@pytest.fixture(scope="session")
def eval_sets(tmp_path_factory):
    """The evaluation tests' sets: toy data, and K=3 images per val label map from a perfect painter and from noise."""
    root = tmp_path_factory.mktemp("eval")
    data = str(root / "toy")
    write_toy_dataset(data, n=96, size=32, seed=0)
    perfect = write_painted_generation(str(root / "perfect"), data, lambda rng, s: render_toy_image(rng, s["label"], s["instance"]), k=3)
    noise = write_painted_generation(str(root / "noise"), data, lambda rng, s: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), k=3)
    return {"root": root, "data": data, "perfect": perfect, "noise": noise, "cache": str(root / "cache"), "k": 3}


_EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave with pytest's exit status once every result is reported, skipping the interpreter's teardown.

    That teardown frees what native libraries hold after their own shutdown (Ray's core worker after several
    sessions in one process, ray-project/ray#31145), and a CI run once ended in a segfault after all tests had
    passed. The jobs' own exits are tested in their subprocesses.
    """
    if _EXIT_STATUS not in config.stash:
        return
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(config.stash[_EXIT_STATUS])
