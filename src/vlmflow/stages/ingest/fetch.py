"""Downloads: HTTP(S) with address checks, redirects, robots headers, size caps,
retries and a deadline per attempt (vlmflow.stages.ingest.deadlines); local files."""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import socket
import time
import urllib.request
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

from vlmflow.stages.ingest.deadlines import Attempt, DeadlineAdapter, attempt_within
from vlmflow.stages.ingest.settings import Failure, IngestSettings

# X-Robots-Tag directives that say "do not use this image for AI training".
NO_AI_DIRECTIVES = frozenset({"noai", "noimageai"})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


MAX_REDIRECTS = 5
BACKOFF_BASE_S = 0.5
CHUNK_BYTES = 1 << 16


def make_session(settings: IngestSettings) -> requests.Session:
    session = requests.Session()
    session.headers["User-Agent"] = settings.user_agent
    # Retries are done by _fetch_http (with backoff and our own failure reasons), and
    # redirects by _http_once (each hop's address is checked).
    adapter = DeadlineAdapter(
        pool_connections=settings.threads, pool_maxsize=settings.threads, max_retries=0
    )
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    # trust_env makes requests scan the environment (proxies, netrc, CA bundle) several
    # times per request: over 1 ms of CPU each with a cluster-sized environment, more
    # than the download itself. The proxies come from _proxies (read once per host)
    # and the CA bundle is read here, once.
    session.trust_env = False
    session.verify = (
        os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    )
    return session


@functools.lru_cache(maxsize=4096)
def _host_proxies(scheme: str, netloc: str) -> dict[str, str]:
    """The environment's proxy for this scheme and host (honouring no_proxy), if any."""
    url = f"{scheme}://{netloc}/"
    proxy = requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))
    return {scheme: proxy} if proxy else {}


def _proxies(url: str) -> dict[str, str]:
    parts = urlsplit(url)
    return _host_proxies(parts.scheme.lower(), parts.netloc.lower())


def _fetch_file(url: str, settings: IngestSettings) -> bytes:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
        raise Failure("invalid_url", "file URLs must be file:///abs/path or file:rel/path")
    path = Path(urllib.request.url2pathname(parts.path))
    try:
        size = os.stat(path).st_size
        if size > settings.max_bytes:
            raise Failure("too_large", f"{size} bytes > max_bytes {settings.max_bytes}")
        return path.read_bytes()
    except FileNotFoundError:
        raise Failure("missing_file", str(path)) from None
    except OSError as exc:  # a folder, no permission: the file is not usable either
        raise Failure("missing_file", f"{path}: {exc.strerror or exc}") from None


# Letters, digits, '-', '_' and '.' (names); ':' and '%' for IPv6 literals and zones.
_HOST_CHARS = re.compile(r"[A-Za-z0-9._:%-]+")


def _resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (what the connection may end up using)."""
    infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    return sorted({str(info[4][0]) for info in infos})


@functools.lru_cache(maxsize=64)
def _networks(cidrs: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)


def _check_address(url: str, settings: IngestSettings) -> None:
    """Refuse URLs whose host is, or resolves to, a non-public address.

    On a cluster node, loopback, private and link-local addresses reach services that
    are not on the internet (cloud metadata endpoints at 169.254.169.254, admin pages);
    a URL list from the web must not be able to make the job fetch them. Checked before
    the first request and again for every redirect.
    """
    parts = urlsplit(url)
    host = parts.hostname
    if host is None:
        raise Failure("invalid_url", "no host")
    try:
        ascii_host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError as exc:
        raise Failure("invalid_url", f"host {host!r}: {exc}") from None
    if not _HOST_CHARS.fullmatch(ascii_host):
        raise Failure("invalid_url", f"host {host!r} has characters a host name cannot have")
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        addresses = _resolve(host, port)
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        raise Failure("connection_error", f"cannot resolve {host}: {exc}") from None
    for text in addresses:
        refused = _non_public(text, settings)
        if refused is not None:
            raise Failure(
                "blocked",
                f"{host} resolves to non-public address {refused} "
                "(ingest.allowed_networks lists the ones to allow)",
            )


def _non_public(text: str, settings: IngestSettings) -> str | None:
    """The address if it is not public and not in allowed_networks, else None."""
    address = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    allowed = _networks(settings.allowed_networks)
    if address.is_global or any(address in network for network in allowed):
        return None
    return str(address)


def _peer_address(response: requests.Response) -> str | None:
    """The address the response came from, if urllib3 still holds the socket."""
    connection = getattr(response.raw, "connection", None)
    sock = getattr(connection, "sock", None)
    if sock is None:  # a "Connection: close" response: the socket sits in the body reader
        reader = getattr(getattr(response.raw, "_fp", None), "fp", None)
        sock = getattr(getattr(reader, "raw", None), "_sock", None)
    try:
        return str(sock.getpeername()[0]) if sock is not None else None
    except OSError:
        return None


def _check_peer(response: requests.Response, settings: IngestSettings, body: bool) -> None:
    """Refuse a response whose connection went to a non-public address.

    _check_address resolves the host before the request, and the connection resolves it
    again: a DNS answer that changes in between (DNS rebinding) is caught here, before
    any of the body is read. Where a ``body`` is to be read, a connection whose peer
    address cannot be read is refused too (the check fails closed: urllib3 then holds its
    socket where this code does not look); a redirect without a body has often handed its
    socket back already, and its next hop is checked anew.
    """
    peer = _peer_address(response)
    if peer is None and not body:
        return
    if peer is None:
        raise Failure(
            "blocked",
            "cannot read the address the response came from, so the DNS-rebinding check "
            "cannot run (refused rather than read unchecked)",
        )
    refused = _non_public(peer, settings)
    if refused is not None:
        raise Failure(
            "blocked",
            f"connected to non-public address {refused} although the host resolved to "
            "public ones before (DNS changed?)",
        )


def _robots_forbid(header: str, user_agent: str) -> str | None:
    """The X-Robots-Tag directive that forbids AI use for us, if any.

    Directives may be scoped to a crawler ("otherbot: noai"); only unscoped ones and
    those naming our user agent's product token apply.
    """
    product = user_agent.split("/", 1)[0].strip().lower()
    for part in header.split(","):
        scope, _, directive = part.rpartition(":")
        scope, directive = scope.strip().lower(), directive.strip().lower()
        if directive in NO_AI_DIRECTIVES and scope in ("", product):
            return part.strip()
    return None


def _http_once(
    url: str, settings: IngestSettings, session: requests.Session, seconds: float
) -> bytes:
    """One attempt, from the request to the body's last byte within ``seconds``."""
    with attempt_within(seconds) as attempt:
        try:
            return _http_hops(url, settings, session, attempt)
        except Failure as failure:
            raise _expired(attempt) if attempt.expired else failure from None
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            if attempt.expired:
                raise _expired(attempt) from None
            raise _request_failure(exc) from None


def _expired(attempt: Attempt) -> Failure:
    return Failure(
        "timeout", f"no whole response within {round(attempt.seconds, 1):g} s", retryable=True
    )


def _http_hops(
    url: str, settings: IngestSettings, session: requests.Session, attempt: Attempt
) -> bytes:
    timeout = (settings.timeout_s, settings.timeout_s)  # each connect and each read
    # Redirects are followed here, not by requests, so each hop's address is checked.
    for _hop in range(MAX_REDIRECTS + 1):
        _check_address(url, settings)
        proxies = _proxies(url)
        with session.get(
            url, stream=True, timeout=timeout, allow_redirects=False, proxies=proxies
        ) as response:
            status = response.status_code
            location = response.headers.get("Location")
            redirect = status in REDIRECT_STATUSES and bool(location)
            if not proxies:  # through a proxy, the peer is the proxy
                _check_peer(response, settings, body=not redirect)
            if redirect:
                url = urljoin(url, location)
                continue
            body = _read_body(response, settings)
            # Before the connection goes back to the pool; a body cut short by the
            # deadline (a server that ends it by closing) is not a whole image.
            attempt.stop()
            if attempt.expired:
                raise _expired(attempt)
            return body
    raise Failure("http_status", f"{status} (more than {MAX_REDIRECTS} redirects)")


def _request_failure(exc: BaseException) -> Failure:
    """The failure reason of an exception from requests (or the socket under it)."""
    if isinstance(exc, requests.Timeout):
        return Failure("timeout", str(exc), retryable=True)
    invalid = (
        requests.exceptions.InvalidURL,
        requests.exceptions.InvalidSchema,
        requests.exceptions.MissingSchema,
        urllib3.exceptions.LocationParseError,
        UnicodeError,  # IDNA encoding of the host name failed
    )
    if isinstance(exc, invalid):
        return Failure("invalid_url", str(exc))
    if isinstance(exc, requests.ConnectionError | requests.exceptions.ChunkedEncodingError):
        # requests reports a read timeout *while streaming the body* as a ConnectionError.
        cause = exc.args[0] if exc.args else None
        reason = "timeout" if isinstance(cause, urllib3.exceptions.ReadTimeoutError) else None
        return Failure(reason or "connection_error", str(exc), retryable=True)
    # e.g. a broken gzip body or invalid headers
    return Failure("connection_error", f"{type(exc).__name__}: {exc}")


def _read_body(response: requests.Response, settings: IngestSettings) -> bytes:
    status = response.status_code
    if not 200 <= status < 300:
        raise Failure("http_status", str(status), retryable=status >= 500)
    if settings.respect_robots_header:
        forbidden = _robots_forbid(response.headers.get("X-Robots-Tag", ""), settings.user_agent)
        if forbidden:
            raise Failure("robots", f"X-Robots-Tag: {forbidden}")
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > settings.max_bytes:
        raise Failure("too_large", f"Content-Length {length} > {settings.max_bytes}")
    body = bytearray()
    # Counted after content decoding, so a gzip bomb is caught as well.
    for chunk in response.iter_content(CHUNK_BYTES):
        body += chunk
        if len(body) > settings.max_bytes:
            raise Failure("too_large", f"body > max_bytes {settings.max_bytes}")
    return bytes(body)


def _fetch_http(
    url: str, settings: IngestSettings, session: requests.Session, shard_deadline: float | None
) -> bytes:
    for attempt in range(settings.retries + 1):
        seconds = settings.timeout_s
        if shard_deadline is not None:
            left = shard_deadline - time.monotonic()
            if left <= 0:
                raise Failure(
                    "timeout",
                    f"the shard's budget (ingest.shard_budget_s: {settings.shard_budget_s:g}) "
                    "was spent before this download's attempt "
                    f"{attempt + 1} of {settings.retries + 1}",
                )
            seconds = min(seconds, left)
        try:
            return _http_once(url, settings, session, seconds)
        except Failure as failure:
            if not failure.retryable or attempt == settings.retries:
                raise
            time.sleep(BACKOFF_BASE_S * 2**attempt)
    raise AssertionError("unreachable: the last attempt returns or raises")


def fetch(
    url: str, settings: IngestSettings, session: requests.Session, shard_deadline: float | None
) -> bytes:
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. "http://[::1" (unbalanced IPv6 bracket)
        raise Failure("invalid_url", str(exc)) from None
    scheme = parts.scheme.lower()
    if scheme == "file":
        return _fetch_file(url, settings)
    if scheme in ("http", "https") and parts.netloc:
        return _fetch_http(url, settings, session, shard_deadline)
    if not scheme:
        raise Failure("invalid_url", "no URL scheme (use file:relative/path for local files)")
    raise Failure("invalid_url", f"unsupported URL scheme {scheme!r} or no host")
