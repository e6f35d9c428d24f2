import os
import shutil

# Without a GPU, Triton kernels run in its CPU interpreter. This must be set before anything imports triton:
# torch may import it, and triton.language's helpers (tl.zeros, ...) are fixed at import time.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import walt_export


@pytest.fixture(scope="session")
def micro():
    """The unit-test cascade, seeded; tests must not modify it."""
    return walt_export.build("micro", seed=0)


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def micro_artifacts(tmp_path_factory, micro):
    """The micro cascade exported once with FP16 variants: (directory, manifest); tests must not modify it."""
    from walt_export.onnx_export import export_artifacts

    directory = tmp_path_factory.mktemp("artifacts") / "micro"
    return directory, export_artifacts(micro.config, lambda name: getattr(micro, name), directory,
                                       {"preset": "micro", "seed": 0}, fp16=True)


@pytest.fixture
def sigint_children():
    """Children started in the test raise KeyboardInterrupt on SIGINT, even when the suite runs in the background.

    A shell without job control starts background jobs with SIGINT ignored (POSIX: `make test &`, nohup) and an ignored
    signal stays ignored across fork and exec, so a child would ignore the test's Ctrl-C and run to completion. A
    handled signal is reset to the default at exec, where Python installs its KeyboardInterrupt handler: so the test
    process handles it while the test runs."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session")
def ray_address():
    """The address of a local Ray cluster of 2 CPUs, started in this process once per session, which the tests'
    commands join with `--ray ADDRESS` (a command's own local cluster takes seconds to start); stopped at the end."""
    ray = pytest.importorskip("ray", reason="the `ray` extra is not installed")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
