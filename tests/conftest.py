"""Shared fixtures, the device selection and the Hypothesis profiles.

Devices. A test that takes the ``device`` fixture runs once per selected device, as
``test_x[cpu]`` and ``test_x[cuda]``. Its models and inputs live there (drawn on the CPU from a
seeded generator, then moved: the same values on every device), and the noise is drawn there,
with a generator of that device.
``--device`` (or the ``FLATOPT_TEST_DEVICE`` environment variable) selects:

- ``all`` (the default): ``cpu``, plus ``cuda`` when ``torch.cuda.is_available()``;
- ``cpu``: ``cpu`` only;
- ``cuda``: the CUDA subset, i.e. every test that takes ``device``, on ``cuda`` only. Tests that
  take no device (pure Python maths, argument errors, the documentation) and tests marked
  ``cpu_only`` are deselected. It is a usage error where CUDA is not available.

So ``pytest --device cuda`` (the same as ``pytest -m "not cpu_only" --device cuda``) is the
CUDA run, and ``benchmarks/gpu_check.sh`` runs it. Tests that are CPU-only by nature (block-wise
CPU draws and thread-count invariance, gloo DDP, torch's CPU quantized tensors) carry
``@pytest.mark.cpu_only(reason=...)`` and never take ``device``.

On CUDA the fixture turns TF32 and reduced-precision reductions off and makes cuDNN
deterministic, once per session, so that fp32 tolerances mean the same on both devices and
bitwise checks (a run repeated with the same seed, a restore, a regenerated ε) compare like with
like. Bitwise claims hold on one device type; nothing compares CPU bits with CUDA bits.

Hypothesis: ``ci`` (the default, also under CI=true) keeps property tests quick; ``dev`` explores
more. Choose with ``HYPOTHESIS_PROFILE=dev pytest``.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DEVICE_CHOICES = ("all", "cpu", "cuda")
# cuBLAS is deterministic on one stream; this makes it so with several streams too. It is read
# when cuBLAS starts, i.e. at the first CUDA matmul, after this file is imported.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        choices=DEVICE_CHOICES,
        default=os.environ.get("FLATOPT_TEST_DEVICE", "all"),
        help="devices for tests that take the `device` fixture: all (cpu, and cuda if "
        "available; the default), cpu, or cuda (the CUDA subset only). Default from "
        "FLATOPT_TEST_DEVICE.",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "cpu_only(reason): CPU-only by nature (CPU draws, gloo, CPU quantized tensors); "
        "deselected by --device cuda",
    )
    choice = config.getoption("--device", default="all")
    if choice not in DEVICE_CHOICES:
        raise pytest.UsageError(
            f"--device / FLATOPT_TEST_DEVICE is {choice!r}; use one of {DEVICE_CHOICES}."
        )
    if choice == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(
            "--device cuda, but torch.cuda.is_available() is False: run it on a machine with "
            "a CUDA GPU and a CUDA build of torch, or use --device cpu."
        )


def selected_devices(config: pytest.Config) -> list[str]:
    """The devices the ``device`` fixture runs on, from ``--device``."""
    choice = config.getoption("--device", default="all")
    if choice == "all":
        return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    return [choice]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "device" in metafunc.fixturenames:
        # Session scope: Hypothesis accepts it in @given tests (it rejects function scope).
        metafunc.parametrize(
            "device", selected_devices(metafunc.config), indirect=True, scope="session"
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("cpu_only") and "device" in getattr(item, "fixturenames", ()):
            raise pytest.UsageError(
                f"{item.nodeid} is marked cpu_only but takes the device fixture; do one or the "
                "other."
            )
    if config.getoption("--device", default="all") != "cuda":
        return
    keep, drop = [], []
    for item in items:
        on_device = "device" in getattr(item, "fixturenames", ())
        (keep if on_device and not item.get_closest_marker("cpu_only") else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _deterministic_cuda() -> None:
    """fp32 matmuls and convolutions in full fp32, half-precision reductions in fp32, and
    deterministic cuDNN algorithms: what the tolerances and bitwise checks assume."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> str:
    """The device type a test runs on: ``"cpu"`` or ``"cuda"`` (see the module docstring).

    A test asks for it by name, ``def test_adds(device): ...``, and builds its tensors with
    ``device=device``.
    """
    if request.param == "cuda":
        _deterministic_cuda()
    return request.param


@pytest.fixture
def one_thread():
    """Tiny models on a shared CPU: extra threads only add synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
