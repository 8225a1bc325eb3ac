"""Ingest download, the first part of step 3 (stage): fetch image bytes over HTTP(S), many requests in flight
on one event loop per worker, with SSRF guards (checked addresses are the ones connected to), deadlines, size
caps, a memory budget for bodies (ByteBudget), bounded redirects, retries of transient failures only, and
X-Robots-Tag opt-outs. Every URL comes back as a DownloadResult.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import email.utils
import ipaddress
import queue
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import aiohttp.abc
import aiohttp.resolver
from pydantic import Field, field_validator, model_validator
from yarl import URL

from pipelines.config import Section
from pipelines.formats.shards import FAILED_TO_DOWNLOAD, SUCCESS

USER_AGENT_VERSION = "0.1"
CONTACT_URL = "https://github.com/clip-ray/clip-ray"
# img2dataset's default opt-out set, so that both tools honour the same publisher wishes.
X_ROBOTS_TAG_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")
MAX_URL_LENGTH = 4096
DNS_CACHE_TTL_S = 300.0
# Without aiodns, lookups are blocking getaddrinfo calls in threads; with many distinct hosts, DNS is often
# the bottleneck, so the sync Downloader gives its loop this many resolver threads.
DNS_THREADS = 32

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# 501 and 505 say the server will never serve this request; other 5xx are worth another try.
PERMANENT_5XX = frozenset({501, 505})
STREAM_CHUNK_BYTES = 64 * 1024

# Instance-metadata services hand out cloud credentials; no configuration may reach them.
# AWS/GCP/Azure/OpenStack/DigitalOcean use 169.254.169.254 (ECS 169.254.170.2), AWS IPv6 IMDS
# fd00:ec2::254, Alibaba 100.100.100.200, Azure's wire server 168.63.129.16, Oracle Cloud 192.0.0.192.
METADATA_NETWORKS = tuple(
    ipaddress.ip_network(net)
    for net in (
        "169.254.0.0/16",
        "fd00:ec2::254/128",
        "100.100.100.200/32",
        "168.63.129.16/32",
        "192.0.0.192/32",
    )
)
CGNAT_NETWORK = ipaddress.ip_network("100.64.0.0/10")
NAT64_NETWORK = ipaddress.ip_network("64:ff9b::/96")
IPV4_COMPATIBLE_NETWORK = ipaddress.ip_network("::/96")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class DownloaderConfig(Section):
    """The `download` section of the ingest config, and how the downloader behaves. Times are seconds, sizes
    bytes."""

    # Total deadline for one URL: every attempt, redirect, body byte and backoff sleep included.
    timeout_s: float = Field(30.0, gt=0, le=300)
    # Per-attempt limits inside the deadline; hitting one is transient, so the attempt is retried.
    connect_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float = Field(10.0, gt=0)  # longest silence allowed between two reads of the body
    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0)
    max_redirects: int = Field(5, ge=0)
    max_retries: int = Field(2, ge=0)
    user_agent_token: str = "clip-ray-ingest"
    respect_x_robots_tag: bool = True
    # Loopback/private/link-local/CGNAT targets are refused unless this is set (tests, intranet mirrors).
    # Cloud metadata addresses stay refused regardless.
    allow_private_networks: bool = False
    max_in_flight: int = Field(256, gt=0)  # concurrent requests per downloader
    max_per_host: int = Field(16, ge=0)  # 0 = no per-host limit
    # Bytes of bodies held at once, streaming or handed out and not yet released (see ByteBudget). At least
    # max_body_bytes, so that any body accepted fits; downloads wait for room rather than fail.
    max_bytes_in_flight: int = Field(1 << 30, gt=0)

    @field_validator("user_agent_token")
    @classmethod
    def _one_word(cls, value: str) -> str:
        if not value.strip() or any(c.isspace() or c in ",:;()" for c in value):
            raise ValueError("must be one word without spaces or ,:;()")
        return value

    @model_validator(mode="after")
    def _budget_holds_a_body(self) -> DownloaderConfig:
        if self.max_bytes_in_flight < self.max_body_bytes:
            raise ValueError(
                f"download.max_bytes_in_flight ({self.max_bytes_in_flight}) is below download.max_body_bytes "
                f"({self.max_body_bytes}); it must hold at least one body of the largest size accepted"
            )
        return self

    @property
    def user_agent(self) -> str:
        return f"Mozilla/5.0 (compatible; {self.user_agent_token}/{USER_AGENT_VERSION}; +{CONTACT_URL})"


@dataclass(frozen=True)
class RetryPacing:
    """How long to wait before retrying: exponential backoff with jitter, or what the server's Retry-After
    asks for, capped. Not a config knob: the defaults hold in every run, tests shorten them."""

    backoff_base_s: float = 0.5
    backoff_max_s: float = 8.0
    max_retry_after_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("backoff_base_s", "backoff_max_s", "max_retry_after_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"RetryPacing.{name} must be >= 0, got {getattr(self, name)!r}")


@dataclass
class DownloadResult:
    """The outcome for one input URL. On failure `body` is None and `error_message` says why.

    A result from Downloader.stream holds its body's bytes in the downloader's budget until release() is
    called (or the result is dropped); results from download_batch hold nothing."""

    url: str
    status: str
    error_message: str | None = None
    body: bytes | None = None
    http_status: int | None = None
    final_url: str | None = None
    content_type: str | None = None
    elapsed: float = 0.0
    attempts: int = 0
    lease: BodyLease | None = field(default=None, repr=False, compare=False)

    def release(self) -> None:
        """Drop the body and give its bytes back to the downloader's budget: call once it is decoded."""
        self.body = None
        if self.lease is not None:
            self.lease.release()
            self.lease = None


class ByteBudget:
    """The bytes of response bodies one downloader holds at once, at most `capacity`.

    A body's bytes are reserved when its response headers arrive: its Content-Length, or max_body_bytes when
    the length is unknown (chunked, or compressed, since aiohttp inflates it), cut to the real size once the
    body is read. A reservation that does not fit waits, first come first served, rather than fails, and a
    reservation never grows while its body streams, so every response holding one can finish: the budget
    cannot deadlock on itself. (Memory held by aiohttp's read buffers, up to 64 KiB a connection, and the one
    join of a body's chunks at a time are outside it.)

    The reservation then either ends with the response (download_batch, which returns every body at once and
    so bounds only the bytes streaming) or passes to the result, which the caller releases once the body is
    decoded (Downloader.stream). In that case the bytes downloaded but not yet decoded, plus those streaming,
    never exceed the capacity; and new URLs are not started while released-later bodies fill half of it, so
    that requests already sent are not left waiting for room while their deadline runs. It lives on the
    downloader's event loop; results may be released from any thread.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0  # reserved: streaming, or held by results not yet released
        self.held = 0  # of which held by results
        self.peak = 0
        self._queue: deque[tuple[int, asyncio.Future]] = deque()
        self._watchers: list[asyncio.Future] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    async def admit(self) -> None:
        """Wait while bodies handed out and not yet released hold more than half the capacity."""
        while self.held > self.capacity // 2:
            watcher = asyncio.get_running_loop().create_future()
            self._watchers.append(watcher)
            await watcher

    async def reserve(self, nbytes: int) -> None:
        """Take `nbytes` (at most the capacity), waiting in turn until they fit."""
        self._loop = asyncio.get_running_loop()
        if not self._queue and self.used + nbytes <= self.capacity:
            self._take(nbytes)
            return
        turn = self._loop.create_future()
        self._queue.append((nbytes, turn))
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # granted, then cancelled before it could resume
                self.give_back(nbytes)
            else:
                self._grant()  # a cancelled turn at the head must not hold up those behind it
            raise

    def give_back(self, nbytes: int) -> None:
        self.used -= nbytes
        self._grant()

    def lease(self, nbytes: int) -> BodyLease:
        """Pass `nbytes` already reserved to a downloaded body, which gives them back when released."""
        return BodyLease(self, nbytes)

    def _take(self, nbytes: int) -> None:
        self.used += nbytes
        self.peak = max(self.peak, self.used)

    def _give_back_lease(self, nbytes: int, held: bool) -> None:
        if held:
            self.held -= nbytes
        self.give_back(nbytes)

    def _grant(self) -> None:
        while self._queue:
            nbytes, turn = self._queue[0]
            if turn.done():
                self._queue.popleft()
            elif self.used + nbytes <= self.capacity:
                self._queue.popleft()
                self._take(nbytes)
                turn.set_result(None)
            else:
                break
        watchers, self._watchers = self._watchers, []
        for watcher in watchers:
            if not watcher.done():
                watcher.set_result(None)


class BodyLease:
    """A downloaded body's share of a ByteBudget. Given back once, from any thread, by release(), or when
    the lease is collected (a result dropped unreleased, a download cancelled after its body arrived)."""

    def __init__(self, budget: ByteBudget, nbytes: int):
        self._budget = budget
        self._nbytes = nbytes
        self._held = False
        self._lock = threading.Lock()

    def hold(self) -> None:
        """Count the bytes as handed out (see ByteBudget.admit); called on the budget's event loop."""
        self._held = True
        self._budget.held += self._nbytes

    def release(self) -> None:
        with self._lock:
            nbytes, self._nbytes = self._nbytes, 0
        loop = self._budget._loop
        if not nbytes or loop is None or loop.is_closed():
            return
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._budget._give_back_lease(nbytes, self._held)
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing waits on it any more
            loop.call_soon_threadsafe(self._budget._give_back_lease, nbytes, self._held)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit the loop may be half torn down
            self.release()


class RefusedAddressError(OSError):
    """A host resolved only to addresses the SSRF policy refuses. An OSError so aiohttp wraps it."""


def address_refusal(ip: IPAddress, allow_private_networks: bool) -> str | None:
    """Why this address may not be connected to, or None if it may."""
    # An IPv6 form that embeds an IPv4 address reaches that IPv4 host on dual-stack or NAT64 networks.
    embedded: ipaddress.IPv4Address | None = None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            embedded = ip.ipv4_mapped
        elif ip.sixtofour is not None:
            embedded = ip.sixtofour
        elif ip in NAT64_NETWORK or (ip in IPV4_COMPATIBLE_NETWORK and int(ip) > 1):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    candidates = [ip] if embedded is None else [ip, embedded]

    for candidate in candidates:
        if any(candidate in net for net in METADATA_NETWORKS if net.version == candidate.version):
            return f"{ip} is a cloud metadata or link-local address"
    if allow_private_networks:
        return None
    # The embedded IPv4 address is what gets reached; the wrapping prefix itself is never "global".
    kind = _non_public_kind(candidates[-1])
    if kind is not None:
        return f"{ip} is not a public address ({kind}; allow_private_networks is off)"
    return None


def _non_public_kind(ip: IPAddress) -> str | None:
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if isinstance(ip, ipaddress.IPv4Address) and ip in CGNAT_NETWORK:
        return "carrier-grade NAT"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:
        return "non-global"
    return None


class GuardedResolver(aiohttp.abc.AbstractResolver):
    """Resolves a host, then hands the connector only the addresses the SSRF policy accepts, so the
    connection goes exactly to a checked address (a second, rebinding lookup never happens)."""

    def __init__(self, allow_private_networks: bool, inner: aiohttp.abc.AbstractResolver | None = None):
        self.allow_private_networks = allow_private_networks
        self.inner = inner if inner is not None else aiohttp.resolver.DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        resolved = await self.inner.resolve(host, port, family)
        accepted, refusals = [], []
        for entry in resolved:
            reason = address_refusal(ipaddress.ip_address(entry["host"]), self.allow_private_networks)
            if reason is None:
                accepted.append(entry)
            else:
                refusals.append(reason)
        if not accepted:
            detail = "; ".join(refusals) if refusals else "no addresses"
            raise RefusedAddressError(f"refused to connect to {host}: {detail}")
        return accepted

    async def close(self) -> None:
        await self.inner.close()


# What a host name may hold once IDNA has made it ASCII: letters, digits, hyphens and (seen in real names,
# though not in the DNS standard) underscores, in dot-separated labels.
_HOST_NAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")


def _ipv4_number(part: str) -> int | None:
    """One dot-separated part of a numeric host read as inet_aton and browsers read it (WHATWG URL standard):
    0x... is hex, 0... is octal, otherwise decimal; None if it is not a number."""
    if not part:
        return None
    if part[:2] in ("0x", "0X"):
        digits, base = part[2:], 16
    elif len(part) > 1 and part[0] == "0":
        digits, base = part[1:], 8
    else:
        digits, base = part, 10
    if not digits:
        return 0  # "0x" alone is zero, as the standard says
    if any(c not in "0123456789abcdef"[:base] for c in digits.lower()):
        return None
    return int(digits, base)


def _ipv4_of_numeric_host(host: str) -> tuple[bool, ipaddress.IPv4Address | None]:
    """Whether a host ends in a number (so browsers and inet_aton read it as IPv4, never look it up as a name),
    and the address they read: one to four parts, each but the last at most 255, the last filling the rest.
    Follows the WHATWG URL standard's "ends in a number" and IPv4 parsers; (True, None) is an invalid host."""
    parts = host.split(".")
    if parts[-1] == "" and len(parts) > 1:
        parts.pop()  # one trailing dot, as in a fully qualified name
    last = parts[-1]
    if not (last.isascii() and last.isdigit()) and _ipv4_number(last) is None:
        return False, None
    numbers = [_ipv4_number(part) for part in parts]
    if len(parts) > 4 or any(n is None for n in numbers):
        return True, None
    *leading, final = numbers
    if any(n > 255 for n in leading) or final >= 256 ** (5 - len(numbers)):
        return True, None
    value = final + sum(n << (8 * (3 - i)) for i, n in enumerate(leading))
    return True, ipaddress.IPv4Address(value)


def host_refusal(host: str, allow_private_networks: bool) -> str | None:
    """Why a URL's host (its ASCII form, as it will be looked up or connected to) is refused, or None.

    A host whose last label is a number is an IPv4 address to browsers and to inet_aton/getaddrinfo, in any
    of the spellings they accept (2130706433, 0x7f.1, 0177.0.0.1, 127.1, 127.0.0.1.). Only the canonical
    dotted quad (four decimal numbers 0-255, no leading zeros, no trailing dot) is judged by
    address_refusal; every other numeric spelling is refused outright, whatever allow_private_networks
    says: no real image URL needs one, and tools disagree on what they mean (yarl keeps them as names that
    getaddrinfo then reads as addresses), so they are a way to slip an address past a check. The same goes
    for IPv6 zone ids (fe80::1%eth0, which pick a network interface) and for characters that no DNS name
    holds (percent escapes among them). IPv6 literals are judged by address_refusal, which judges
    IPv4-mapped and IPv4-compatible forms (::ffff:7f00:1) by the IPv4 address they embed.
    """
    host = host.lower()
    if ":" in host:
        if "%" in host:
            return f"[{host}] has an IPv6 zone id, and zone ids are refused"
        try:
            literal = ipaddress.IPv6Address(host)
        except ValueError:
            return f"[{host}] is not a valid IPv6 address"
        return address_refusal(literal, allow_private_networks)
    if not set(host) <= _HOST_NAME_CHARACTERS:
        odd = "".join(sorted(set(host) - _HOST_NAME_CHARACTERS))
        return f"{host!r} holds characters that no DNS name holds ({odd!r})"
    if "" in host.removesuffix(".").split("."):
        return f"{host!r} has an empty label"
    numeric, ipv4 = _ipv4_of_numeric_host(host)
    if not numeric:
        return None
    if ipv4 is None:
        return f"{host} ends in a number but is not an IPv4 address"
    if host != str(ipv4):
        return (
            f"{host} is a non-canonical spelling of the IPv4 address {ipv4}, "
            "refused whatever allow_private_networks says"
        )
    return address_refusal(ipv4, allow_private_networks)


def check_url(url: Any, config: DownloaderConfig) -> tuple[URL | None, str | None]:
    """Parse and vet a URL before any network use: (parsed URL, None) or (None, reason).

    The host is vetted by host_refusal: IP literals never reach the resolver, so they are judged here, and
    numeric hosts in any spelling but the canonical one are refused (see host_refusal for why)."""
    if not isinstance(url, str) or not url.strip():
        return None, "empty URL"
    url = url.strip()
    if len(url) > MAX_URL_LENGTH:
        return None, f"URL is {len(url)} characters long (limit {MAX_URL_LENGTH})"
    try:
        parsed = URL(url)
        scheme = parsed.scheme.lower()
        # The ASCII form (IDNA applied) is what is looked up or connected to.
        host = parsed.raw_host
        port = parsed.port
    except (ValueError, UnicodeError) as err:
        return None, f"malformed URL: {err}"
    if scheme not in ("http", "https"):
        return None, f"unsupported URL scheme {scheme!r}" if scheme else "URL has no scheme"
    if not host:
        return None, "URL has no host"
    if parsed.raw_user is not None or parsed.raw_password is not None:
        return None, "URLs with credentials are refused"
    if port is None or not 0 < port < 65536:
        return None, f"invalid port in URL: {port}"
    reason = host_refusal(host, config.allow_private_networks)
    if reason is not None:
        return None, f"refused to connect to {host}: {reason}"
    return parsed, None


# Directives that carry a value after a colon ("unavailable_after: <date>") are not bot names.
_VALUED_ROBOTS_DIRECTIVES = frozenset(
    {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}
)


def x_robots_tag_opt_out(
    header_values: Iterable[str], user_agent_token: str, directives: Iterable[str]
) -> str | None:
    """The first opt-out directive that applies to us, or None. A value may be scoped to one bot
    ("otherbot: noai, noindex"); such scoped directives only count when the bot is us."""
    token = user_agent_token.strip().lower()
    wanted = {d.strip().lower() for d in directives}
    for value in header_values:
        bot: str | None = None
        for part in value.split(","):
            name, colon, rest = part.partition(":")
            name = name.strip().lower()
            if colon and name not in _VALUED_ROBOTS_DIRECTIVES:
                # "bot: directive" scopes this directive and the ones after it in the same value.
                bot, directive = name, rest.strip().lower()
            else:
                directive = name
            if directive in wanted and (bot is None or bot == token):
                return directive
    return None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), or None if absent/invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None or when.tzinfo is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def is_retryable_http_status(status: int) -> bool:
    return status in (408, 429) or (500 <= status < 600 and status not in PERMANENT_5XX)


@dataclass
class _Attempt:
    """What one attempt (one chain of redirects) ended with."""

    body: bytes | None = None
    error_message: str | None = None
    retryable: bool = False
    retry_after: float | None = None
    http_status: int | None = None
    final_url: str | None = None
    content_type: str | None = None
    lease: BodyLease | None = None  # the budget's bytes that `body` holds


class AsyncDownloader:
    """The asyncio core: one ClientSession (shared connection pool, guarded resolver) per event loop.
    Use as `async with AsyncDownloader(config) as d: results = await d.download_many(urls)`."""

    def __init__(self, config: DownloaderConfig | None = None, pacing: RetryPacing | None = None):
        self.config = config if config is not None else DownloaderConfig()
        self.pacing = pacing if pacing is not None else RetryPacing()
        self.session: aiohttp.ClientSession | None = None
        self._slots: asyncio.Semaphore | None = None
        self.budget = ByteBudget(self.config.max_bytes_in_flight)

    async def open(self) -> None:
        cfg = self.config
        connector = aiohttp.TCPConnector(
            resolver=GuardedResolver(cfg.allow_private_networks),
            limit=cfg.max_in_flight,
            limit_per_host=cfg.max_per_host,
            ttl_dns_cache=DNS_CACHE_TTL_S,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=cfg.connect_timeout_s, sock_read=cfg.read_timeout_s
            ),
            headers={"User-Agent": cfg.user_agent, "Accept": "image/*,*/*;q=0.8"},
            # Unrelated image URLs must not share cookies; proxies come from config, never the environment.
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        self._slots = asyncio.Semaphore(cfg.max_in_flight)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def __aenter__(self) -> AsyncDownloader:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def download_many(self, urls: Sequence[Any]) -> list[DownloadResult]:
        """All URLs concurrently (bounded by max_in_flight); results in input order. The budget bounds only
        the bytes streaming: every body of the batch is returned at once."""
        return list(await asyncio.gather(*(self.download(url) for url in urls)))

    async def download_each(self, urls: Sequence[Any], deliver: Callable[[Any], None]) -> None:
        """Download every URL, at most max_in_flight at once, handing `deliver` (index, result) as each
        finishes (or an exception, if the downloader itself breaks). Each result holds its body's bytes in
        the budget until released, so the caller must release results as it goes, not collect them."""

        async def one(index: int, url: Any) -> None:
            try:
                result = await self.download(url, hold=True)
            except Exception as error:
                deliver(error)
                return
            deliver((index, result))

        pending: set[asyncio.Future] = set()
        try:
            for index, url in enumerate(urls):
                if len(pending) >= self.config.max_in_flight:
                    _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                pending.add(asyncio.ensure_future(one(index, url)))
            if pending:
                await asyncio.wait(pending)
        finally:
            for task in pending:
                task.cancel()

    async def download(self, url: Any, hold: bool = False) -> DownloadResult:
        """One URL, retried within its deadline. Never raises for anything the URL or server does. With
        `hold`, a body keeps its bytes in the budget until the result is released (see ByteBudget)."""
        if self.session is None or self._slots is None:
            raise RuntimeError("AsyncDownloader is not open: use `async with AsyncDownloader(...)`")
        # Waiting for room happens before the deadline starts: it is the worker's delay, not the server's.
        await self.budget.admit()
        async with self._slots:
            start = time.monotonic()
            result = await self._download_with_retries(url, start)
            result.elapsed = time.monotonic() - start
        if result.lease is not None:
            if hold:
                result.lease.hold()
            else:
                result.lease.release()
                result.lease = None
        return result

    async def _download_with_retries(self, url: Any, start: float) -> DownloadResult:
        cfg = self.config
        shown_url = url if isinstance(url, str) else ("" if url is None else str(url))
        parsed, reason = check_url(url, cfg)
        if parsed is None:
            return DownloadResult(url=shown_url, status=FAILED_TO_DOWNLOAD, error_message=reason)

        deadline = start + cfg.timeout_s
        attempts = 0
        last: _Attempt | None = None
        while True:
            attempts += 1
            try:
                # wait_for cancels the attempt mid-body, so a slow-drip server cannot outlive the deadline.
                attempt = await asyncio.wait_for(self._attempt(parsed), deadline - time.monotonic())
            except asyncio.TimeoutError:
                message = f"deadline of {cfg.timeout_s:g} s exceeded"
                if last is not None:
                    message += f" (earlier attempt: {last.error_message})"
                return DownloadResult(
                    url=shown_url, status=FAILED_TO_DOWNLOAD, error_message=message, attempts=attempts
                )
            if attempt.body is not None:
                return DownloadResult(
                    url=shown_url,
                    status=SUCCESS,
                    body=attempt.body,
                    http_status=attempt.http_status,
                    final_url=attempt.final_url,
                    content_type=attempt.content_type,
                    attempts=attempts,
                    lease=attempt.lease,
                )
            last = attempt
            message = attempt.error_message
            if attempt.retryable and attempts <= cfg.max_retries:
                delay = self._retry_delay(attempts, attempt.retry_after)
                if time.monotonic() + delay < deadline:
                    await asyncio.sleep(delay)
                    continue
                message = f"{message}; no time left before the deadline to retry"
            elif attempt.retryable and cfg.max_retries > 0:
                message = f"{message} (gave up after {attempts} attempts)"
            return DownloadResult(
                url=shown_url,
                status=FAILED_TO_DOWNLOAD,
                error_message=message,
                http_status=attempt.http_status,
                final_url=attempt.final_url,
                content_type=attempt.content_type,
                attempts=attempts,
            )

    def _retry_delay(self, attempts_so_far: int, retry_after: float | None) -> float:
        pacing = self.pacing
        if retry_after is not None:
            return min(retry_after, pacing.max_retry_after_s)
        # Exponential backoff with jitter, so that workers hit by the same outage do not retry in lockstep.
        ceiling = min(pacing.backoff_max_s, pacing.backoff_base_s * 2 ** (attempts_so_far - 1))
        return ceiling * random.uniform(0.5, 1.0)

    async def _attempt(self, start_url: URL) -> _Attempt:
        """Follow redirects by hand (each target vetted like the original), then read the body."""
        try:
            return await self._follow_and_read(start_url)
        except aiohttp.ClientConnectorDNSError as err:
            if isinstance(err.os_error, RefusedAddressError):
                return _Attempt(error_message=str(err.os_error))
            return _Attempt(error_message=f"DNS lookup failed for {err.host}: {err.os_error}")
        except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError) as err:
            return _Attempt(error_message=f"TLS error: {err}")
        except aiohttp.ClientConnectorError as err:
            # Refused/unreachable hosts are down, not busy; resets and connect timeouts are transient.
            transient = isinstance(err.os_error, (ConnectionResetError, TimeoutError))
            return _Attempt(error_message=f"cannot connect: {err}", retryable=transient)
        except aiohttp.ConnectionTimeoutError:
            return _Attempt(
                error_message=f"connect timed out after {self.config.connect_timeout_s:g} s", retryable=True
            )
        except aiohttp.SocketTimeoutError:
            return _Attempt(
                error_message=f"server silent for {self.config.read_timeout_s:g} s", retryable=True
            )
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as err:
            return _Attempt(error_message=f"connection lost: {type(err).__name__}: {err}", retryable=True)
        except aiohttp.ClientError as err:
            return _Attempt(error_message=f"{type(err).__name__}: {err}")
        except (ValueError, UnicodeError) as err:
            return _Attempt(error_message=f"malformed URL or response: {err}")
        except (ConnectionError, TimeoutError) as err:
            return _Attempt(error_message=f"connection lost: {type(err).__name__}: {err}", retryable=True)
        except Exception as err:
            # A server can provoke errors nobody listed; the row still comes back, with the reason.
            return _Attempt(error_message=f"unexpected error: {type(err).__name__}: {err}")

    async def _follow_and_read(self, start_url: URL) -> _Attempt:
        cfg = self.config
        assert self.session is not None
        url = start_url
        visited = {str(start_url)}
        status = None
        for _hop in range(cfg.max_redirects + 1):
            async with self.session.get(url, allow_redirects=False) as response:
                status = response.status
                if status in REDIRECT_STATUSES:
                    location = response.headers.get("Location")
                    if not location:
                        return _Attempt(
                            error_message=f"HTTP {status} redirect without a Location", http_status=status
                        )
                    target = url.join(URL(location))
                    if str(target) in visited:
                        return _Attempt(
                            error_message=f"redirect loop: {url} -> {target}",
                            http_status=status,
                            final_url=str(url),
                        )
                    visited.add(str(target))
                    vetted, reason = check_url(str(target), cfg)
                    if vetted is None:
                        return _Attempt(
                            error_message=f"redirect to {target} refused: {reason}",
                            http_status=status,
                            final_url=str(url),
                        )
                    url = vetted
                    continue
                return await self._read_final(response, url)
        return _Attempt(
            error_message=f"too many redirects (more than {cfg.max_redirects})",
            http_status=status,
            final_url=str(url),
        )

    async def _read_final(self, response: aiohttp.ClientResponse, url: URL) -> _Attempt:
        cfg = self.config
        status = response.status
        content_type = response.headers.get("Content-Type")
        done = _Attempt(http_status=status, final_url=str(url), content_type=content_type)
        if not 200 <= status < 300:
            done.error_message = f"HTTP {status} {response.reason or ''}".rstrip()
            done.retryable = is_retryable_http_status(status)
            if done.retryable:
                done.retry_after = parse_retry_after(response.headers.get("Retry-After"))
            return done
        if cfg.respect_x_robots_tag:
            directive = x_robots_tag_opt_out(
                response.headers.getall("X-Robots-Tag", []), cfg.user_agent_token, X_ROBOTS_TAG_DIRECTIVES
            )
            if directive is not None:
                done.error_message = f"use of this image is disallowed by X-Robots-Tag: {directive}"
                return done
        if response.content_length is not None and response.content_length > cfg.max_body_bytes:
            response.close()
            done.error_message = (
                f"body too large: Content-Length {response.content_length} > limit {cfg.max_body_bytes}"
            )
            return done
        # aiohttp reads exactly Content-Length bytes of an unencoded body; an encoded one is inflated to an
        # unknown size, and so is a chunked one. Unknown sizes reserve the largest body accepted.
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        known = response.content_length if encoding in ("", "identity") else None
        reserved = cfg.max_body_bytes if known is None else known
        await self.budget.reserve(reserved)
        try:
            # Content-Length may lie or be absent, so the cap is enforced while reading.
            chunks, size = [], 0
            async for chunk in response.content.iter_chunked(STREAM_CHUNK_BYTES):
                size += len(chunk)
                if size > reserved:
                    response.close()
                    done.error_message = f"body too large: more than {reserved} bytes streamed"
                    return done
                chunks.append(chunk)
            if size == 0:
                done.error_message = "empty body"
                return done
            done.body = b"".join(chunks)
            self.budget.give_back(reserved - size)
            done.lease, reserved = self.budget.lease(size), 0
            return done
        finally:
            if reserved:  # failed or cancelled while streaming
                self.budget.give_back(reserved)


class Downloader:
    """Synchronous front for Ray Data and tests: owns an event loop in a background thread and one
    AsyncDownloader on it, so connections are reused across batches. Call close() (or use `with`)."""

    def __init__(self, config: DownloaderConfig | None = None, pacing: RetryPacing | None = None):
        self.config = config if config is not None else DownloaderConfig()
        self._loop = asyncio.new_event_loop()
        self._loop.set_default_executor(
            concurrent.futures.ThreadPoolExecutor(DNS_THREADS, thread_name_prefix="downloader-dns")
        )
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="downloader-event-loop", daemon=True
        )
        self._thread.start()
        self._core = AsyncDownloader(self.config, pacing)
        self._run(self._core.open())

    def _run(self, coroutine: Any) -> Any:
        # A loop of our own in its own thread works whether or not the caller already runs an event loop.
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    @property
    def budget(self) -> ByteBudget:
        return self._core.budget

    def download_batch(self, urls: Iterable[Any]) -> list[DownloadResult]:
        """Download every URL concurrently; one DownloadResult per URL, in input order. Every body comes
        back at once, so only the bytes streaming are bounded by max_bytes_in_flight: use stream() to bound
        the bodies waiting to be decoded too."""
        if self._loop.is_closed():
            raise RuntimeError("Downloader is closed")
        return self._run(self._core.download_many(list(urls)))

    def stream(self, urls: Iterable[Any]) -> Iterator[tuple[int, DownloadResult]]:
        """Download every URL, yielding (position in `urls`, result) as each finishes. A body counts against
        max_bytes_in_flight until result.release() (or until the result is dropped): release each one once
        it is decoded, and the bodies streaming plus those waiting to be decoded stay within the budget,
        downloads waiting for room meanwhile. Closing the iterator early cancels the downloads left."""
        if self._loop.is_closed():
            raise RuntimeError("Downloader is closed")
        urls = list(urls)
        arrived: queue.SimpleQueue = queue.SimpleQueue()
        work = asyncio.run_coroutine_threadsafe(self._core.download_each(urls, arrived.put), self._loop)
        try:
            for _ in range(len(urls)):
                item = arrived.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
            work.result()
        finally:
            if not work.done():
                work.cancel()
            while True:  # results that arrived but were never taken
                try:
                    item = arrived.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, tuple):
                    item[1].release()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._core.close())
        self._run(self._loop.shutdown_default_executor())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> Downloader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
