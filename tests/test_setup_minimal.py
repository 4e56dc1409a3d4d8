"""scripts/setup.sh --minimal (what scripts/run.sh calls) installs only what the embedded
default needs: never docker, redis, postgresql or a browser. apt-get and pip are stubs here
that record their arguments; PATH holds nothing else, so every `command -v` check fails."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_setup(
    tmp_path: Path, *args: str, data_dir: Path, check: bool = True
) -> tuple[list[str], list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    apt_log, pip_log = tmp_path / "apt.log", tmp_path / "pip.log"
    for log in (apt_log, pip_log):
        log.write_text("")
    for name, log in (("apt-get", apt_log), ("python-stub", pip_log)):
        stub = bin_dir / name
        stub.write_text(f'#!/bin/bash\necho "$*" >> {log}\n')
        stub.chmod(0o755)
    dirname = shutil.which("dirname")
    assert dirname is not None
    (bin_dir / "dirname").unlink(missing_ok=True)
    (bin_dir / "dirname").symlink_to(dirname)
    env = {
        "PATH": str(bin_dir),
        "PYTHON": str(bin_dir / "python-stub"),
        "SURFING_DATA_DIR": str(data_dir),
        "HOME": os.environ.get("HOME", "/tmp"),
    }
    subprocess.run(
        ["/bin/bash", str(ROOT / "scripts" / "setup.sh"), *args], env=env, check=check,
        capture_output=True, timeout=60,
    )
    return apt_log.read_text().splitlines(), pip_log.read_text().splitlines()


def test_minimal_setup_installs_the_dataset_and_the_package_only(tmp_path: Path) -> None:
    no_data = tmp_path / "no-data"
    apt, pip = _run_setup(tmp_path, "--minimal", data_dir=no_data)
    assert apt == ["update -q", "install -y -q dataset-fashion-mnist"]
    assert pip[0].endswith("install -q --disable-pip-version-check torch==2.13.0")  # first
    assert len(pip) == 2 and " -e . " in pip[1] and "[dev]" not in pip[1]

    data = tmp_path / "data"
    data.mkdir()
    (data / "train-images-idx3-ubyte.gz").write_bytes(b"")
    apt, pip = _run_setup(tmp_path, "--minimal", data_dir=data)
    assert apt == [] and len(pip) == 2  # the data set is there: no apt at all


def test_full_setup_still_installs_the_services(tmp_path: Path) -> None:
    """The same stubs see the test suite's set-up ask for what --minimal leaves out (its exit
    status is not the point: later steps may need tools this bare PATH lacks)."""
    apt, pip = _run_setup(tmp_path, data_dir=tmp_path / "no-data", check=False)
    install = apt[-1].split()
    for package in ("docker-compose", "redis-server", "postgresql"):
        assert package in install
    assert pip and "torch==2.13.0" in pip[0]
