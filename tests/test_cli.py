"""`augsvc` command-line checks that need no running server: environment variables, value
ranges, the token file, list flags, health's TLS flags, preview and bench arguments. Each bad
input is one usage line and exit 2 — never a traceback, never a silently different setting."""

from __future__ import annotations

import io
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from augsvc import cli
from augsvc.server import ServerSettings, create_server


class _Captured(Exception):
    pass


@pytest.fixture
def settings_of(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run `augsvc serve ARGS` up to the server's creation; return the settings it would serve with."""
    import augsvc.server

    seen: list[ServerSettings] = []

    def capture(address: str, settings: ServerSettings) -> Any:
        seen.append(settings)
        raise _Captured

    monkeypatch.setattr(augsvc.server, "create_server", capture)

    def run(*args: str) -> ServerSettings:
        with pytest.raises(_Captured):
            cli.main(["serve", *args])
        return seen[-1]

    return run


@pytest.mark.parametrize(("env", "args", "message"), [
    ({"AUGSVC_PORT": "abc"}, [], "argument --port: 'abc' is not an integer"),
    ({}, ["--port", "70000"], "argument --port: 70000 is outside [0, 65535]"),
    ({}, ["--metrics-port", "-5"], "argument --metrics-port: -5 is outside [0, 65535]"),
    ({}, ["--workers", "0"], "argument --workers: 0 is outside >= 1"),
    ({}, ["--max-concurrent-rpcs", "0"], "argument --max-concurrent-rpcs: 0 is outside >= 1"),
    ({"AUGSVC_GRACE": "-1"}, [], "argument --grace: -1.0 is outside >= 0"),
])
def test_bad_serve_values_are_usage_errors(env: dict[str, str], args: list[str], message: str,
                                           monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", *args])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_a_bad_serve_variable_leaves_the_other_commands_alone(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Before, AUGSVC_PORT=abc crashed even `augsvc health` (the container's HEALTHCHECK) and --help."""
    monkeypatch.setenv("AUGSVC_PORT", "abc")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening: refused at once
        port = s.getsockname()[1]
        assert cli.main(["health", "--target", f"127.0.0.1:{port}", "--timeout", "5"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().out


def test_empty_variables_are_unset_and_a_flag_wins(settings_of: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUGSVC_GRACE", "")
    monkeypatch.setenv("AUGSVC_MAX_CONNECTION_AGE", "")
    monkeypatch.setenv("AUGSVC_PORT", "abc")
    settings = settings_of("--port", "0", "--unix", "/tmp/augsvc-test-never.sock")
    assert settings.grace_seconds == 10.0 and settings.max_connection_age_seconds is None


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("TRUE", True), ("yes", True), ("On", True),
                                                 ("0", False), ("False", False), ("no", False)])
def test_boolean_variables(value: str, expected: bool, settings_of: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUGSVC_VERIFY", value)
    monkeypatch.setenv("AUGSVC_SHARED_MEMORY", value)
    settings = settings_of()
    assert settings.verify is expected and settings.shared_memory is expected  # before: "TRUE" was false


def test_a_boolean_variable_that_is_neither_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("AUGSVC_INSECURE", "maybe")
    assert cli.main(["serve"]) == 2
    assert "AUGSVC_INSECURE='maybe' is not a boolean" in capsys.readouterr().err


def test_a_dataset_flag_replaces_the_variables_list(settings_of: Any, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Before, --dataset added to AUGSVC_DATASETS (the image's digits could not be dropped)."""
    monkeypatch.setenv("AUGSVC_DATASETS", "digits=builtin:digits")
    assert settings_of().datasets == {"digits": "builtin:digits"}
    assert settings_of("--dataset", "other=builtin:digits").datasets == {"other": "builtin:digits"}
    assert cli.main(["serve", "--dataset", "d=builtin:digits", "--dataset", "d=/data/x"]) == 2
    assert "--dataset: ['d'] given twice" in capsys.readouterr().err


def test_an_empty_token_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before, a token file holding only whitespace (an empty secret mounted by mistake) started a
    server that served everyone."""
    (tmp_path / "token").write_text(" \n")
    assert cli.main(["serve", "--token-file", str(tmp_path / "token")]) == 2
    assert "the file is empty" in capsys.readouterr().err
    with pytest.raises(ValueError, match="token: empty"):
        create_server("127.0.0.1:0", ServerSettings(workers=1, token=""))


def test_a_second_server_on_a_live_unix_socket_is_refused(tmp_path: Path) -> None:
    """gRPC would unlink the first server's socket and take the name: the first one would run on,
    unreachable. A stale socket file (nobody listening) is still replaced."""
    path = tmp_path / "s.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    try:
        with pytest.raises(ValueError, match="another server is listening there"):
            create_server(f"unix:{path}", ServerSettings(workers=1))
    finally:
        listener.close()
    server, _ = create_server(f"unix:{path}", ServerSettings(workers=1))  # stale now: taken over
    server.stop(0)


def test_health_needs_both_halves_of_a_client_certificate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before, --tls-cert without --tls-key aborted inside gRPC (exit 134), and --tls-key alone
    was ignored (the check went out in plaintext)."""
    (tmp_path / "c.pem").write_text("x")
    for half in (["--tls-cert", str(tmp_path / "c.pem")], ["--tls-key", str(tmp_path / "c.pem")]):
        assert cli.main(["health", "--target", "127.0.0.1:1", *half]) == 2
        assert "--tls-cert and --tls-key: give both" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["preview", "--spec", "{}", "--cols", "0"], ["bench", "--spec", "{}", "--batch", "0"],
                                  ["bench", "--spec", "{}", "--seconds", "0"], ["bench", "--spec", "{}", "--side", "0"],
                                  ["bench", "--spec", "{}", "--side", "100000"]])
def test_preview_and_bench_refuse_impossible_sizes(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    assert info.value.code == 2 and "is outside" in capsys.readouterr().err


def test_preview_reads_an_image_as_the_server_does(tmp_path: Path) -> None:
    """A 16-bit gray PNG keeps its high byte and one channel, as dataset files do (before: Pillow's
    conversion saturated it to almost white)."""
    from augsvc.preview import load_image

    values = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 21)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG")
    (tmp_path / "g16.png").write_bytes(buf.getvalue())
    image = load_image(str(tmp_path / "g16.png"))
    assert image.shape == (48, 64, 1) and np.array_equal(image[..., 0], (values >> 8).astype(np.uint8))
    (tmp_path / "x.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="x.png"):
        load_image(str(tmp_path / "x.png"))
