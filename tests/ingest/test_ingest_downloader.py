"""Downloader tests against a real HTTP server on loopback: hostile servers and URLs become failure
results with reasons, transient failures are retried, SSRF targets are refused before connecting."""

import asyncio
import gc
import ipaddress
import socket
import threading
import time
from dataclasses import replace
from urllib.parse import quote

import pytest
from yarl import URL

from pipelines.formats.shards import FAILED_TO_DOWNLOAD, SUCCESS
from pipelines.ingest.downloader import (
    AsyncDownloader,
    ByteBudget,
    Downloader,
    DownloaderConfig,
    GuardedResolver,
    RefusedAddressError,
    RetryPacing,
    address_refusal,
    check_url,
    parse_retry_after,
    x_robots_tag_opt_out,
)
from tests.http_fixtures import HttpTestServer

# The test server lives on loopback, so every downloader that talks to it must allow private networks.
FAST = dict(allow_private_networks=True, timeout_s=10.0)
QUICK_RETRIES = RetryPacing(backoff_base_s=0.05, backoff_max_s=0.2)


@pytest.fixture(scope="module")
def server():
    srv = HttpTestServer().start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def downloader():
    with Downloader(DownloaderConfig(**FAST), QUICK_RETRIES) as d:
        yield d


def download_one(downloader, url):
    (result,) = downloader.download_batch([url])
    return result


def assert_failed(result, *fragments):
    assert result.status == FAILED_TO_DOWNLOAD, result
    assert result.body is None
    for fragment in fragments:
        assert fragment in result.error_message, result.error_message


# --- address policy and URL checks (no network) ------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fc00::1",
        "fd12:3456::1",
        "fe80::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "64:ff9b::a00:1",  # NAT64 form of 10.0.0.1
        "2002:7f00:1::1",  # 6to4 form of 127.0.0.1
    ],
)
def test_non_public_addresses_refused_unless_private_networks_allowed(address):
    ip = ipaddress.ip_address(address)
    assert address_refusal(ip, allow_private_networks=False) is not None
    assert address_refusal(ip, allow_private_networks=True) is None


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254",
        "169.254.170.2",
        "fd00:ec2::254",
        "100.100.100.200",
        "::ffff:169.254.169.254",
        "168.63.129.16",
    ],
)
def test_metadata_addresses_refused_even_with_private_networks_allowed(address):
    for allow in (False, True):
        reason = address_refusal(ipaddress.ip_address(address), allow_private_networks=allow)
        assert reason is not None and "metadata" in reason


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2001:4860:4860::8888", "::ffff:8.8.8.8"])
def test_public_addresses_allowed(address):
    assert address_refusal(ipaddress.ip_address(address), allow_private_networks=False) is None


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("", "empty URL"),
        ("   ", "empty URL"),
        (None, "empty URL"),
        ("file:///etc/passwd", "unsupported URL scheme 'file'"),
        ("ftp://example.com/a.jpg", "unsupported URL scheme 'ftp'"),
        ("data:image/png;base64,iVBORw0KGgo=", "unsupported URL scheme 'data'"),
        ("javascript:alert(1)", "unsupported URL scheme 'javascript'"),
        ("example.com/a.jpg", "no scheme"),
        ("http://", "no host"),
        ("http://user:secret@example.com/a.jpg", "credentials"),
        ("http://example.com:99999/a.jpg", "malformed URL"),
        ("http://[::1/a.jpg", "malformed URL"),
        ("http://example.com/" + "a" * 5000, "characters long"),
        ("http://169.254.169.254/latest/meta-data/", "metadata"),
        ("http://[::ffff:a9fe:a9fe]/", "metadata"),
        ("http://127.0.0.1/a.jpg", "loopback"),
    ],
)
def test_check_url_rejects_with_reason(url, fragment):
    parsed, reason = check_url(url, DownloaderConfig())
    assert parsed is None
    assert fragment in reason


def test_check_url_accepts_ordinary_image_urls():
    for url, host in (
        ("http://example.com/a.jpg", "example.com"),
        (" https://cdn.example.org:8443/a%20b.png?w=2 ", "cdn.example.org"),
    ):
        parsed, reason = check_url(url, DownloaderConfig())
        assert reason is None
        assert parsed.host == host


# Every spelling that inet_aton, getaddrinfo and browsers (WHATWG URL standard) read as an IPv4 address, with
# the address they read: only the canonical dotted quad is judged by the address policy, the rest are refused.
NON_CANONICAL_IPV4_HOSTS = [
    ("2130706433", "127.0.0.1"),  # one decimal number
    ("0x7f000001", "127.0.0.1"),  # one hex number
    ("0X7F000001", "127.0.0.1"),
    ("017700000001", "127.0.0.1"),  # one octal number
    ("0177.0.0.1", "127.0.0.1"),  # octal part
    ("0x7f.0.0.1", "127.0.0.1"),  # hex part
    ("0x7f.1", "127.0.0.1"),  # two parts, the last filling three bytes
    ("127.1", "127.0.0.1"),
    ("127.0.1", "127.0.0.1"),  # three parts, the last filling two bytes
    ("127.0.0.1.", "127.0.0.1"),  # trailing dot
    ("127.0.0.01", "127.0.0.1"),  # leading zero: octal
    ("00000000000000000127.0.0.1", "87.0.0.1"),  # octal 0127 = 87, however many zeros
    ("0", "0.0.0.0"),
    ("0x", "0.0.0.0"),  # an empty hex number is zero
    ("0xa9fea9fe", "169.254.169.254"),  # the metadata service
    ("2852039166", "169.254.169.254"),
    ("0xa.0.0.1", "10.0.0.1"),
    ("134744072", "8.8.8.8"),  # public addresses too: refused for the spelling, not the address
    ("8.8.8.8.", "8.8.8.8"),
    ("1.2.3.0x4", "1.2.3.4"),
]


@pytest.mark.parametrize("host, address", NON_CANONICAL_IPV4_HOSTS)
@pytest.mark.parametrize("allow", [False, True])
def test_check_url_refuses_non_canonical_numeric_hosts_whatever_private_networks_allow(host, address, allow):
    for url in (f"http://{host}/a.jpg", f"https://{host}:8443/a.jpg", f"http://{host.upper()}/"):
        parsed, reason = check_url(url, DownloaderConfig(allow_private_networks=allow))
        assert parsed is None, url
        assert f"non-canonical spelling of the IPv4 address {address}" in reason


@pytest.mark.parametrize(
    "host",
    ["1.2.3.4.5", "256.1.1.1", "1.2.3.256", "1.2.65536", "09.1.1.1", "0x1g.1", "example.123", "foo.0x10"],
)
@pytest.mark.parametrize("allow", [False, True])
def test_check_url_refuses_hosts_that_end_in_a_number_but_are_no_ipv4_address(host, allow):
    parsed, reason = check_url(f"http://{host}/a.jpg", DownloaderConfig(allow_private_networks=allow))
    assert parsed is None and "ends in a number but is not an IPv4 address" in reason


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("http://[fe80::1%25eth0]/a.jpg", "zone id"),
        ("http://[fe80::1%eth0]/a.jpg", "zone id"),
        ("http://[::ffff:127.0.0.01]/a.jpg", "not a valid IPv6 address"),
        ("http://%31%32%37.0.0.1/a.jpg", "characters that no DNS name holds ('%')"),
        ("http://127.0.0.1%2e/a.jpg", "characters that no DNS name holds ('%')"),
        ("http://a b.example.com/a.jpg", "characters that no DNS name holds (' ')"),
        ("http://127.0.0.1;example.com/a.jpg", "characters that no DNS name holds (';')"),
        ("http://a..example.com/a.jpg", "empty label"),
        ("http://127.0.0.1../a.jpg", "empty label"),
    ],
)
@pytest.mark.parametrize("allow", [False, True])
def test_check_url_refuses_zone_ids_and_hosts_no_resolver_should_guess_at(url, fragment, allow):
    parsed, reason = check_url(url, DownloaderConfig(allow_private_networks=allow))
    assert parsed is None and fragment in reason


@pytest.mark.parametrize(
    "url, embedded_kind",
    [
        ("http://[::ffff:127.0.0.1]/", "loopback"),
        ("http://[::ffff:7f00:1]/", "loopback"),
        ("http://[0:0:0:0:0:ffff:127.0.0.1]/", "loopback"),
        ("http://[::127.0.0.1]/", "loopback"),  # IPv4-compatible
        ("http://[::ffff:10.0.0.1]/", "private"),
        ("http://[::ffff:192.168.0.1]/", "private"),
    ],
)
def test_check_url_judges_ipv4_mapped_and_compatible_ipv6_by_the_embedded_address(url, embedded_kind):
    parsed, reason = check_url(url, DownloaderConfig())
    assert parsed is None and f"({embedded_kind};" in reason
    parsed, reason = check_url(url, DownloaderConfig(allow_private_networks=True))
    assert reason is None and parsed is not None
    for allow in (False, True):
        _, reason = check_url(
            "http://[::ffff:169.254.169.254]/", DownloaderConfig(allow_private_networks=allow)
        )
        assert "metadata" in reason
    assert check_url("http://[::ffff:8.8.8.8]/", DownloaderConfig()) == (
        URL("http://[::ffff:8.8.8.8]/"),
        None,
    )


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/a.jpg",
        "http://1password.com/a.jpg",
        "http://123.example.com/a.jpg",
        "http://123.example.com./a.jpg",  # a fully qualified name
        "http://1e100.net/a.jpg",
        "http://3com.com/a.jpg",
        "http://0x.example.com/a.jpg",  # numeric-looking labels before the last are names
        "http://cdn.1.2.3.example/a.jpg",
        "http://1.2.3.4e/a.jpg",  # the last label is not a number
        "http://img_cdn.example.org/a.jpg",
        "http://xn--nxasmq6b.com/a.jpg",  # punycode
        "http://\u30c9\u30e1\u30a4\u30f3.\u30c6\u30b9\u30c8/a.jpg",  # IDN, sent as punycode
        "http://8.8.8.8/a.jpg",  # a canonical public address
        "http://[2001:4860:4860::8888]/a.jpg",
    ],
)
def test_check_url_accepts_host_names_and_canonical_public_addresses(url):
    parsed, reason = check_url(url, DownloaderConfig())
    assert reason is None and parsed is not None


@pytest.mark.parametrize(
    "values, opted_out",
    [
        (["noai"], "noai"),
        (["NoImageAI"], "noimageai"),
        (["noindex, nofollow"], "noindex"),
        (["nofollow", "noimageindex"], "noimageindex"),
        (["otherbot: noai"], None),
        (["clip-ray-ingest: noai"], "noai"),
        (["otherbot: noindex, nofollow"], None),
        (["unavailable_after: 25 Jun 2010 15:00:00 PST"], None),
        (["max-image-preview: large, noai"], "noai"),
        (["all"], None),
        ([], None),
    ],
)
def test_x_robots_tag_opt_out(values, opted_out):
    directives = ("noai", "noimageai", "noindex", "noimageindex")
    assert x_robots_tag_opt_out(values, "clip-ray-ingest", directives) == opted_out


def test_parse_retry_after_seconds_and_http_date():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    now = 1_700_000_000.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:40 GMT", now=now) == pytest.approx(20.0)
    assert parse_retry_after("Tue, 14 Nov 2023 22:00:00 GMT", now=now) == 0.0


def test_config_validation_names_the_bad_field():
    with pytest.raises(ValueError, match="timeout_s"):
        DownloaderConfig(timeout_s=0)
    with pytest.raises(ValueError, match="user_agent_token"):
        DownloaderConfig(user_agent_token="two words")
    assert "clip-ray-ingest/0.1" in DownloaderConfig().user_agent


def test_guarded_resolver_filters_resolved_addresses():
    async def resolve(allow, host):
        resolver = GuardedResolver(allow_private_networks=allow)
        try:
            return await resolver.resolve(host, 80, socket.AF_INET)
        finally:
            await resolver.close()

    with pytest.raises(RefusedAddressError, match="loopback"):
        asyncio.run(resolve(False, "localhost"))
    assert [r["host"] for r in asyncio.run(resolve(True, "localhost"))] == ["127.0.0.1"]
    with pytest.raises(RefusedAddressError, match="metadata"):
        asyncio.run(resolve(True, "169.254.169.254"))


# --- against the real server ---------------------------------------------------------------------------------


def test_good_image_downloaded(server, downloader):
    result = download_one(downloader, server.url("/image.jpg"))
    assert result.status == SUCCESS, result.error_message
    assert result.body == server.jpeg
    assert result.http_status == 200
    assert result.content_type == "image/jpeg"
    assert result.final_url == server.url("/image.jpg")
    assert result.error_message is None and result.attempts == 1 and result.elapsed > 0


def test_404_and_403_are_not_retried(server, downloader):
    for code in (404, 403):
        result = download_one(downloader, server.url(f"/status/{code}"))
        assert_failed(result, f"HTTP {code}")
        assert result.http_status == code and result.attempts == 1
        assert server.hits[f"status/{code}"] == 1


def test_500_then_200_is_retried_and_counted(server, downloader):
    result = download_one(downloader, server.url("/flaky/five-hundred?fail=1&code=500"))
    assert result.status == SUCCESS, result.error_message
    assert result.attempts == 2 and server.hits["flaky/five-hundred"] == 2


def test_persistent_503_gives_up_after_max_retries(server, downloader):
    result = download_one(downloader, server.url("/flaky/always-503?fail=100&code=503"))
    assert_failed(result, "HTTP 503", "gave up after 3 attempts")
    assert server.hits["flaky/always-503"] == 3


def test_429_honours_retry_after(server, downloader):
    result = download_one(downloader, server.url("/flaky/rate-limited?fail=1&code=429&retry_after=1"))
    assert result.status == SUCCESS, result.error_message
    first, second = server.hit_times["flaky/rate-limited"]
    assert second - first >= 0.9  # the server asked for a one-second pause


def test_retry_after_capped_and_bounded_by_deadline(server):
    with Downloader(DownloaderConfig(**FAST), replace(QUICK_RETRIES, max_retry_after_s=0.1)) as d:
        result = download_one(d, server.url("/flaky/capped?fail=1&code=429&retry_after=3600"))
    assert result.status == SUCCESS and result.attempts == 2
    config = DownloaderConfig(**{**FAST, "timeout_s": 1.0})
    with Downloader(config, replace(QUICK_RETRIES, max_retry_after_s=60)) as d:
        result = download_one(d, server.url("/flaky/no-time?fail=1&code=503&retry_after=30"))
    assert_failed(result, "HTTP 503", "no time left")
    assert server.hits["flaky/no-time"] == 1


def test_slow_drip_cut_off_at_deadline(server):
    with Downloader(DownloaderConfig(**{**FAST, "timeout_s": 2.0}), QUICK_RETRIES) as d:
        started = time.monotonic()
        result = download_one(d, server.url("/slow-drip"))
        took = time.monotonic() - started
    assert_failed(result, "deadline of 2 s exceeded")
    assert took < 8.0  # the server would drip for 60 s


def test_redirect_chain_within_limit_followed(server, downloader):
    result = download_one(downloader, server.url("/chain/5"))
    assert result.status == SUCCESS, result.error_message
    assert result.final_url == server.url("/chain/0") and result.body == server.jpeg


def test_too_many_redirects(server, downloader):
    result = download_one(downloader, server.url("/chain/6"))
    assert_failed(result, "too many redirects")
    assert result.attempts == 1


def test_redirect_loop_detected(server, downloader):
    result = download_one(downloader, server.url("/loop/a"))
    assert_failed(result, "redirect loop")
    assert result.attempts == 1


def test_redirect_to_metadata_address_refused(server, downloader):
    target = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"
    result = download_one(downloader, server.url(f"/redirect?location={quote(target, safe='')}"))
    assert_failed(result, "redirect to", "metadata")


def test_redirect_to_unsupported_scheme_refused(server, downloader):
    result = download_one(
        downloader, server.url(f"/redirect?location={quote('file:///etc/passwd', safe='')}")
    )
    assert_failed(result, "unsupported URL scheme 'file'")


def test_oversize_body_with_content_length_refused(server):
    with Downloader(DownloaderConfig(**{**FAST, "max_body_bytes": 64 * 1024}), QUICK_RETRIES) as d:
        result = download_one(d, server.url(f"/big?size={200 * 1024}"))
    assert_failed(result, "body too large", "Content-Length 204800")


def test_oversize_body_without_content_length_cut_while_streaming(server):
    with Downloader(DownloaderConfig(**{**FAST, "max_body_bytes": 64 * 1024}), QUICK_RETRIES) as d:
        result = download_one(d, server.url(f"/big?size={4 * 1024 * 1024}&chunked=1"))
        within_limit = download_one(d, server.url(f"/big?size={60 * 1024}&chunked=1"))
    assert_failed(result, "body too large", "streamed")
    assert within_limit.status == SUCCESS and len(within_limit.body) == 60 * 1024


def test_x_robots_tag_noai_honoured_by_default_and_ignorable(server, downloader):
    url = server.url("/robots?tag=noai")
    assert_failed(download_one(downloader, url), "X-Robots-Tag: noai")
    other_bot = download_one(downloader, server.url("/robots?tag=" + quote("otherbot: noai")))
    assert other_bot.status == SUCCESS
    addressed_to_us = download_one(
        downloader, server.url("/robots?tag=" + quote("clip-ray-ingest: noimageai"))
    )
    assert_failed(addressed_to_us, "noimageai")
    with Downloader(DownloaderConfig(**{**FAST, "respect_x_robots_tag": False}), QUICK_RETRIES) as d:
        assert download_one(d, url).status == SUCCESS


def test_connection_reset_mid_body_is_failure_after_retries(server, downloader):
    result = download_one(downloader, server.url("/reset-mid-body"))
    assert_failed(result, "connection lost")
    assert result.attempts == 3 and server.hits["reset-mid-body"] == 3


def test_empty_body_is_failure(server, downloader):
    assert_failed(download_one(downloader, server.url("/empty")), "empty body")


def test_refused_connection_is_failure():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on the port any more.
    with Downloader(DownloaderConfig(**FAST), QUICK_RETRIES) as d:
        result = download_one(d, f"http://127.0.0.1:{port}/a.jpg")
    assert_failed(result, "cannot connect")
    assert result.attempts == 1


def test_dns_failure_is_failure(downloader):
    # .invalid never resolves (RFC 6761).
    assert_failed(download_one(downloader, "http://no-such-host.invalid/a.jpg"), "DNS lookup failed")


def test_loopback_refused_without_allow_private_networks(server):
    with Downloader(DownloaderConfig(timeout_s=5.0)) as d:
        literal, by_name, decimal, short = d.download_batch(
            [
                server.url("/image.jpg"),
                f"http://localhost:{server.port}/image.jpg",
                f"http://2130706433:{server.port}/image.jpg",
                f"http://127.1:{server.port}/image.jpg",
            ]
        )
    assert_failed(literal, "loopback")
    assert_failed(by_name, "refused to connect to localhost", "loopback")
    assert_failed(decimal)
    assert_failed(short)


def test_non_canonical_loopback_spellings_refused_before_connecting_even_with_private_networks(
    server, downloader
):
    # The server listens on 127.0.0.1, which allow_private_networks lets through in its canonical spelling.
    spellings = ["2130706433", "127.1", "0x7f.0.0.1", "0177.0.0.1", "127.0.0.1."]
    results = downloader.download_batch(
        [server.url("/image.jpg")] + [f"http://{host}:{server.port}/image.jpg" for host in spellings]
    )
    assert results[0].status == SUCCESS, results[0].error_message
    for result in results[1:]:
        assert_failed(result, "non-canonical spelling of the IPv4 address 127.0.0.1")
        assert result.attempts == 0
    target = f"http://2130706433:{server.port}/image.jpg"
    result = download_one(downloader, server.url(f"/redirect?location={quote(target, safe='')}"))
    assert_failed(result, "redirect to", "non-canonical spelling")


def test_localhost_allowed_with_allow_private_networks(server, downloader):
    result = download_one(downloader, f"http://localhost:{server.port}/image.jpg")
    assert result.status == SUCCESS, result.error_message


def test_metadata_refused_even_with_allow_private_networks(downloader):
    for url in (
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/",
        "http://100.100.100.200/",
    ):
        result = download_one(downloader, url)
        assert_failed(result, "metadata")
        assert result.attempts == 0  # refused before any connection attempt


def test_batch_of_mixed_urls_keeps_input_order_and_reuses_connections(server):
    urls, expected = [], []
    for i in range(200):
        kind = i % 5
        if kind in (0, 1, 2):
            urls.append(server.url(f"/echo/{i}"))
            expected.append((SUCCESS, f"image-{i}".encode()))
        elif kind == 3:
            urls.append(server.url(f"/status/404?i={i}"))
            expected.append((FAILED_TO_DOWNLOAD, None))
        else:
            urls.append(f"ftp://example.com/{i}.jpg" if i % 2 else f"http://[bad{i}")
            expected.append((FAILED_TO_DOWNLOAD, None))
    server.reset_counters()
    with Downloader(DownloaderConfig(**{**FAST, "max_in_flight": 64, "max_per_host": 8}), QUICK_RETRIES) as d:
        results = d.download_batch(urls)
    assert [r.url for r in results] == urls
    assert [(r.status, r.body) for r in results] == expected
    assert server.requests_served == 160
    # 160 requests over at most 8 parallel keep-alive connections to the one host.
    assert len(server.connections) <= 8 < server.requests_served


def test_async_core_usable_inside_an_event_loop(server):
    async def main():
        async with AsyncDownloader(DownloaderConfig(**FAST), QUICK_RETRIES) as d:
            return await d.download_many([server.url("/image.jpg"), "gopher://x/"])

    good, bad = asyncio.run(main())
    assert good.status == SUCCESS and good.body == server.jpeg
    assert_failed(bad, "unsupported URL scheme 'gopher'")


# --- the memory budget for bodies ----------------------------------------------------------------------------

MIB = 1 << 20


def settled(downloader: Downloader, timeout_s: float = 10.0) -> ByteBudget:
    """The budget once releases made from other threads have reached the event loop."""
    deadline = time.monotonic() + timeout_s
    while downloader.budget.used and time.monotonic() < deadline:
        time.sleep(0.01)
    return downloader.budget


def test_budget_must_hold_the_largest_body():
    with pytest.raises(ValueError, match=r"max_bytes_in_flight \(1048576\) is below download.max_body_bytes"):
        DownloaderConfig(max_body_bytes=2 * MIB, max_bytes_in_flight=MIB)
    DownloaderConfig(max_body_bytes=MIB, max_bytes_in_flight=MIB)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_stream_keeps_undecoded_bodies_within_the_budget_and_waits_rather_than_fails(server, chunked):
    # Twelve 1 MiB bodies through a 3 MiB budget, all requested at once, and a consumer that keeps every
    # body it gets until none has come for half a second: without the budget it would hold all twelve.
    cfg = DownloaderConfig(
        **{
            **FAST,
            "timeout_s": 120.0,
            "max_body_bytes": MIB,
            "max_bytes_in_flight": 3 * MIB,
            "max_in_flight": 12,
        }
    )
    suffix = "&chunked=1" if chunked else ""
    urls = [server.url(f"/big?size={MIB}&n={i}{suffix}") for i in range(12)]
    held: list = []
    most_held = 0
    last_arrival = [time.monotonic()]
    lock = threading.Lock()
    done = threading.Event()

    def release_when_quiet():
        while not done.wait(0.05):
            with lock:
                if held and time.monotonic() - last_arrival[0] > 0.5:
                    for result in held:
                        result.release()
                    held.clear()

    releaser = threading.Thread(target=release_when_quiet, daemon=True)
    releaser.start()
    arrived = []
    with Downloader(cfg, QUICK_RETRIES) as d:
        for index, result in d.stream(urls):
            with lock:
                arrived.append((index, result.status, result.error_message))
                held.append(result)
                most_held = max(most_held, sum(len(r.body) for r in held))
                last_arrival[0] = time.monotonic()
        done.set()
        releaser.join()
        for result in held:
            result.release()
        budget = settled(d)
        assert (budget.used, budget.held) == (0, 0)
        assert budget.peak <= 3 * MIB
    assert sorted(index for index, _, _ in arrived) == list(range(12))
    assert all(status == SUCCESS for _, status, _ in arrived), arrived
    assert most_held <= 3 * MIB


def test_one_body_may_fill_the_whole_budget_without_deadlock(server):
    # Unknown lengths reserve max_body_bytes each, here the whole budget: one body at a time, all succeed.
    cfg = DownloaderConfig(
        **{**FAST, "timeout_s": 60.0, "max_body_bytes": 256 * 1024, "max_bytes_in_flight": 256 * 1024}
    )
    urls = [server.url(f"/big?size={200 * 1024}&chunked=1&n={i}") for i in range(10)]
    with Downloader(cfg, QUICK_RETRIES) as d:
        statuses = []
        for _, result in d.stream(urls):
            statuses.append(result.status)
            result.release()
        batch = d.download_batch(urls)
        assert settled(d).used == 0
    assert statuses == [SUCCESS] * 10
    assert [len(r.body) for r in batch] == [200 * 1024] * 10  # the batch's bodies are the caller's to keep


def test_results_dropped_or_left_behind_give_their_bytes_back(server):
    cfg = DownloaderConfig(**{**FAST, "max_body_bytes": MIB, "max_bytes_in_flight": 2 * MIB})
    urls = [server.url(f"/big?size={MIB // 2}&n={i}") for i in range(8)]
    with Downloader(cfg, QUICK_RETRIES) as d:
        # Dropped without release(): collecting the result gives the bytes back, so the stream goes on.
        assert sum(1 for _ in d.stream(urls)) == 8
        gc.collect()
        assert settled(d).used == 0
        # Leaving the stream early cancels what is left, and nothing stays reserved.
        for _, result in d.stream(urls):
            result.release()
            break
        gc.collect()
        assert settled(d).used == 0
        assert [r.status for r in d.download_batch(urls[:2])] == [SUCCESS, SUCCESS]
