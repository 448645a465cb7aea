"""`python -m afqmc_dist.download`: real zips served through file:// URLs, no mocks and no network.

Success needs the official files (their checksums are hard-coded in the module), so those tests use the copies in
../shared/data/afqmc and skip when it is absent; every failure path runs everywhere.
"""

from __future__ import annotations

import filecmp
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
from conftest import limit

from afqmc_dist.download import EXPECTED_SHA256, main

ROOT = Path(__file__).resolve().parents[1]
REAL_AFQMC = Path(__file__).resolve().parents[2] / "shared" / "data" / "afqmc"
NAMES = list(EXPECTED_SHA256)
needs_real_data = pytest.mark.skipif(not REAL_AFQMC.is_dir(), reason=f"{REAL_AFQMC} is absent")


def make_zip(path: Path, files: dict[str, bytes | Path], folder: str = "") -> str:
    """Write a zip of `files` (contents, or paths to copy) under `folder`; return its file:// URL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            arcname = f"{folder}/{name}" if folder else name
            if isinstance(content, Path):
                archive.write(content, arcname)
            else:
                archive.writestr(arcname, content)
    return path.as_uri()


def fake_files() -> dict[str, bytes]:
    return {name: b'{"sentence1": "a", "sentence2": "b", "label": "0"}\n' for name in NAMES}


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder` with its content and mtime, to prove nothing changed."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(capsys) -> str:
    """The single line on stderr, which must start with "error: "."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def run_failing(args: list[str], dest: Path, capsys) -> str:
    """Run main() on a download meant to fail into `dest/afqmc`; check exit 2 and nothing left behind."""
    dest.mkdir(parents=True, exist_ok=True)
    assert main([*args, "--output_dir", str(dest / "afqmc")]) == 2
    assert os.listdir(dest) == [], "output dir or temporary folder left behind"
    return error_line(capsys)


def test_checksum_mismatch_names_file_and_leaves_nothing(tmp_path, capsys):
    url = make_zip(tmp_path / "src" / "afqmc_public.zip", fake_files())
    line = run_failing(["--url", url], tmp_path / "dest", capsys)
    assert "train.json" in line and "sha256" in line and url in line
    assert EXPECTED_SHA256["train.json"] in line


def test_missing_file_url(tmp_path, capsys):
    url = (tmp_path / "nowhere.zip").as_uri()
    line = run_failing(["--url", url], tmp_path / "dest", capsys)
    assert line.startswith(f"error: cannot download {url}: ")
    assert "No such file" in line


def test_connection_refused_on_loopback(tmp_path, capsys):
    url = "http://127.0.0.1:9/afqmc_public.zip"  # discard port: nothing listens, refused at once
    line = run_failing(["--url", url], tmp_path / "dest", capsys)
    assert line.startswith(f"error: cannot download {url}: ")


def test_not_a_zip(tmp_path, capsys):
    bogus = tmp_path / "src" / "afqmc_public.zip"
    bogus.parent.mkdir()
    bogus.write_bytes(os.urandom(4096))
    line = run_failing(["--url", bogus.as_uri()], tmp_path / "dest", capsys)
    assert line == f"error: {bogus.as_uri()} is not a zip file (4096 bytes downloaded)"


def test_file_missing_from_zip(tmp_path, capsys):
    files = fake_files()
    del files["test.json"]
    url = make_zip(tmp_path / "src" / "afqmc_public.zip", files, folder="afqmc_public")
    line = run_failing(["--url", url], tmp_path / "dest", capsys)
    assert "test.json not found in" in line and url in line


def test_missing_parent_folders_are_removed_on_failure(tmp_path, capsys):
    url = make_zip(tmp_path / "src" / "afqmc_public.zip", fake_files())
    assert main(["--url", url, "--output_dir", str(tmp_path / "dest" / "data" / "afqmc")]) == 2
    error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_existing_output_dir_untouched_on_failure(tmp_path, capsys):
    out = tmp_path / "dest" / "afqmc"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine\n")
    (out / "train.json").write_text("an old, wrong train.json\n")
    before = snapshot(tmp_path / "dest")
    url = make_zip(tmp_path / "src" / "afqmc_public.zip", fake_files())
    assert main(["--url", url, "--output_dir", str(out)]) == 2
    assert "sha256" in error_line(capsys)
    assert snapshot(tmp_path / "dest") == before
    assert os.listdir(tmp_path / "dest") == ["afqmc"]


def test_output_dir_that_is_a_file(tmp_path, capsys):
    out = tmp_path / "afqmc"
    out.write_text("not a folder")
    assert main(["--url", (tmp_path / "x.zip").as_uri(), "--output_dir", str(out)]) == 2
    assert "is not a folder" in error_line(capsys)


def test_module_runs_as_script(tmp_path):
    url = (tmp_path / "nowhere.zip").as_uri()
    proc = subprocess.run([sys.executable, "-m", "afqmc_dist.download", "--url", url,
                           "--output_dir", str(tmp_path / "out")],
                          check=False, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: cannot download {url}: ") and proc.stderr.count("\n") == 1


@needs_real_data
def test_real_files_in_a_folder_then_already_present(tmp_path, capsys):
    url = make_zip(tmp_path / "src" / "afqmc_public.zip", {n: REAL_AFQMC / n for n in NAMES}, folder="afqmc_public")
    out = tmp_path / "data" / "afqmc_public"
    assert main(["--url", url, "--output_dir", str(out)]) == 0
    assert "sha256 verified" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == sorted(NAMES)
    assert all(filecmp.cmp(out / n, REAL_AFQMC / n, shallow=False) for n in NAMES)
    assert os.listdir(tmp_path / "data") == ["afqmc_public"], "temporary folder left behind"

    before = snapshot(out)
    gone = (tmp_path / "gone.zip").as_uri()  # would fail if fetched: proves nothing is downloaded
    assert main(["--url", gone, "--output_dir", str(out)]) == 0
    assert "already holds" in capsys.readouterr().out
    assert snapshot(out) == before


@needs_real_data
def test_real_files_at_top_level_with_force_into_existing_dir(tmp_path, capsys):
    url = make_zip(tmp_path / "src" / "afqmc_public.zip", {n: REAL_AFQMC / n for n in NAMES})
    out = tmp_path / "afqmc"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    (out / "dev.json").write_text("stale\n")
    assert main(["--url", url, "--output_dir", str(out), "--force"]) == 0
    assert "sha256 verified" in capsys.readouterr().out
    assert (out / "notes.txt").read_text() == "mine\n"
    assert all(filecmp.cmp(out / n, REAL_AFQMC / n, shallow=False) for n in NAMES)
    assert sorted(os.listdir(tmp_path)) == ["afqmc", "src"]


def test_an_encrypted_member_is_one_line(tmp_path, capsys):
    zip_path = tmp_path / "src" / "afqmc_public.zip"
    url = make_zip(zip_path, fake_files())
    data = bytearray(zip_path.read_bytes())
    entry = data.find(b"PK\x01\x02")  # the first central-directory entry: mark its member as encrypted
    data[entry + 8] |= 0x1
    zip_path.write_bytes(bytes(data))

    line = run_failing(["--url", url], tmp_path / "dest", capsys)

    assert line.startswith("error: train.json in ") and "cannot be unpacked: " in line and "encrypted" in line


def test_a_bad_flag_is_one_line(capsys):
    assert main(["--ouput_dir", "x"]) == 2
    assert error_line(capsys) == "error: unrecognized arguments: --ouput_dir x (see --help)"


class TrickleHandler(http.server.BaseHTTPRequestHandler):
    """Announces a large zip and sends it one byte at a time: a download that is still running when stopped."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(1 << 20))
        self.end_headers()
        try:
            while True:
                self.wfile.write(b"P")
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:
            pass  # the client went away

    def log_message(self, *args):
        pass


@pytest.fixture
def trickling_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), TrickleHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/afqmc_public.zip"
    server.shutdown()
    server.server_close()


def test_ctrl_c_during_the_download_is_one_line_exit_3_and_leaves_nothing(tmp_path, trickling_url):
    dest = tmp_path / "dest"
    run = subprocess.Popen([sys.executable, "-m", "afqmc_dist.download", "--url", trickling_url,
                            "--output_dir", str(dest / "data" / "afqmc")], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(dest.glob("data/.afqmc.download-*/afqmc_public.zip")):  # the download is under way
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()
        time.sleep(0.1)
    run.send_signal(signal.SIGINT)
    stdout, stderr = run.communicate(timeout=limit(60))

    assert run.returncode == 3, stderr
    assert stderr.startswith("stopped: SIGINT received: stopped at once") and stderr.count("\n") == 1, stderr
    assert stdout == ""
    assert not dest.exists() or os.listdir(dest) == [], "temporary folder and created folders removed"
