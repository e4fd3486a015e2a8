"""`tickwire feed nats|rabbitmq|mqtt`: help, and errors said in one line, not as tracebacks."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bridges.conftest import write_map
from tickwire.cli import main
from tickwire.core.redis_process import RedisProcess, free_port

MAP = '[bridge]\non_unmapped = "skip"\n\n[[route]]\ntopic = "md/{symbol}"\nchannel = "trades"\n'


@pytest.mark.parametrize("broker", ["nats", "rabbitmq", "mqtt"])
def test_feed_bridge_help_explains_the_guarantees(
    broker: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(["feed", broker, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "acknowledged to the broker only once Redis holds its event" in text
    assert "--config MAP.toml" in text
    assert f"[{broker}]" in text


def test_feed_bridge_says_when_the_broker_cannot_be_reached(
    redis_server: RedisProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_map(tmp_path, MAP)
    url = f"mqtt://127.0.0.1:{free_port()}"
    assert (
        main(["feed", "mqtt", "--url", url, "--config", str(path), "--redis", redis_server.url])
        == 1
    )
    assert f"cannot start the mqtt bridge on {url}" in capsys.readouterr().err


def test_feed_bridge_says_what_is_wrong_with_the_map(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_map(tmp_path, MAP.replace("topic", "subject"))
    assert main(["feed", "mqtt", "--url", "mqtt://x", "--config", str(path)]) == 1
    assert "'subject' is not a mqtt key; use 'topic'" in capsys.readouterr().err
