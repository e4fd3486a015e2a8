"""Redis URLs over TLS: `rediss://` and its `ssl_*` options, parsed and checked at start."""

from __future__ import annotations

from pathlib import Path

import pytest

from tickwire.core.errors import ConfigError
from tickwire.core.redis_process import TlsFiles
from tickwire.core.redis_target import RedisTarget
from tickwire.core.redis_wire import RedisAddress
from tickwire.core.tls import ClientTls


def test_rediss_takes_the_ssl_options_and_shows_as_rediss(tls_files: TlsFiles) -> None:
    a = RedisAddress.parse(
        f"rediss://u:pw@cache.example:6380/3?ssl_ca_certs={tls_files.ca}"
        f"&ssl_certfile={tls_files.cert}&ssl_keyfile={tls_files.key}&ssl_check_hostname=false"
    )
    assert (a.host, a.port, a.db, a.username, a.password) == ("cache.example", 6380, 3, "u", "pw")
    assert a.tls == ClientTls(
        str(tls_files.ca), str(tls_files.cert), str(tls_files.key), True, False
    )
    assert str(a) == "rediss://cache.example:6380/3"
    assert RedisAddress.parse("rediss://h").tls == ClientTls()  # the system's CAs, checked
    assert RedisAddress.parse("redis://h").tls is None


def test_ssl_cert_reqs_none_turns_the_name_check_off_too() -> None:
    tls = RedisAddress.parse("rediss://h?ssl_cert_reqs=none").tls
    assert tls is not None and not tls.verify and not tls.check_hostname


def test_the_seeds_of_a_cluster_and_the_sentinels_all_get_the_tls(tls_files: TlsFiles) -> None:
    cluster = RedisTarget.parse(f"rediss://h1:7000,h2:7001/0?ssl_ca_certs={tls_files.ca}")
    assert [s.tls for s in cluster.seeds] == [ClientTls(str(tls_files.ca))] * 2
    assert str(cluster) == "rediss://h1:7000,h2:7001/0"
    sentinel = RedisTarget.parse(
        f"rediss+sentinel://:d@s1,s2/tw/1?sentinel_password=sp&ssl_ca_certs={tls_files.ca}"
    )
    assert [s.tls for s in sentinel.seeds] == [ClientTls(str(tls_files.ca))] * 2
    assert sentinel.sentinel_password == "sp" and sentinel.seeds[0].password == "d"
    assert str(sentinel) == "rediss+sentinel://s1:26379,s2:26379/tw/1"
    assert RedisTarget.parse("redis+sentinel://s1/tw").seeds[0].tls is None


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://h/0?ssl_ca_certs=/x.pem", "ssl_ca_certs .* TLS options need rediss://"),
        ("rediss://h/0?ssl_ca_cert=/x.pem", "unknown option ssl_ca_cert"),
        ("rediss://h/0?ssl_cert_reqs=maybe", "ssl_cert_reqs must be required or none"),
        ("rediss://h/0?ssl_check_hostname=perhaps", "ssl_check_hostname must be true or false"),
        ("rediss://h/0?ssl_keyfile=/k.pem", "ssl_keyfile without ssl_certfile"),
        ("rediss://h/0?ssl_ca_certs=/nowhere/ca.pem", "cannot set up TLS for"),
        ("redis+sentinel://s1/tw?ssl_ca_certs=/x.pem", "unknown option ssl_ca_certs"),
        ("rediss+sentinel://s1/tw?sentinel_pass=x", "unknown option sentinel_pass"),
    ],
)
def test_a_mistake_in_the_tls_options_is_a_config_error_at_start(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        RedisTarget.parse(url)


def test_a_client_certificate_that_cannot_be_read_is_refused_without_the_password(
    tmp_path: Path,
) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(ConfigError, match="cannot set up TLS") as caught:
        RedisAddress.parse(f"rediss://:s3cret@h/0?ssl_certfile={junk}")
    assert "s3cret" not in str(caught.value)
