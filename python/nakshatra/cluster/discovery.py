"""LAN discovery: stages announce themselves with DNS-SD over multicast DNS, clients find them.

A stage (``nak serve``) registers one service of type ``_nakshatra._tcp.local.`` (python-zeroconf)
whose SRV record carries its port, whose A records carry the address it listens on, and whose TXT
record carries what a client needs to build a chain before connecting:

=================  ==========================================================================
``txtvers``        version of this TXT layout (``1``)
``model_sha256``   sha256 of the whole model (hex, 64 characters), as in HELLO_OK
``layer_start``    first global layer the stage holds
``layer_end``      one past its last layer: the range is HALF-OPEN ``[layer_start, layer_end)``,
                   as in slice metadata and HELLO_OK (``0`` / ``10`` is layers 0-9)
``n_layer``        layers of the whole model
``arch``           llama.cpp architecture (``llama``, ``gemma3``, ...)
``proto``          wire protocol version (``nakshatra._nakshatra.PROTOCOL_VERSION``)
``key``            ``1`` when the stage needs the cluster key (``nak keygen``), else ``0``
``name``           the model's file name without the ``.A-B.gguf`` of a slice (for people)
=================  ==========================================================================

The announcement is a hint, never trusted: the client still checks every stage's own HELLO_OK
(model sha256, layer range, protocol) when :class:`nakshatra.client.chain.Chain` connects, and a keyed
stage still authenticates the client. :func:`discover` lists what answers within a timeout;
:func:`discover_chain` picks stages whose layer ranges join from layer 0 to the last (all replicas
of each chosen range), or raises NakError naming the missing layers.

Multicast DNS is UDP port 5353 to 224.0.0.251: it reaches one LAN segment (not across routers or
most VPNs; give ``--chain`` there). IPv4 only. A stage stopped by SIGINT/SIGTERM sends a goodbye
(its records are withdrawn at once); a killed one simply stops answering, and every discovery
starts with an empty cache, so it is not found again.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import NakError
from ..ranges import LayerRange

SERVICE_TYPE = "_nakshatra._tcp.local."
TXT_VERSION = 1
DEFAULT_TIMEOUT_S = 2.0
# The shortest listen that hears every stage: a responder that multicast its records within the
# last second (to another client's question) must wait until that second is over before it
# multicasts them again (RFC 6762 section 6), after a random 20-120 ms response delay; the
# browser's first question itself goes out after 20-120 ms (python-zeroconf). Worst case about
# 1.25 s plus 200 ms of aggregation: 1.5 s.
MIN_TIMEOUT_S = 1.5

_WILDCARD = ("", "0.0.0.0", "::", "*")


def _protocol_version() -> int:
    from .. import _nakshatra

    return int(_nakshatra.PROTOCOL_VERSION)


def model_display_name(file_name: str) -> str:
    """The model's name for people from a model or slice file name: ``smollm2.0-9.gguf`` ->
    ``smollm2``, ``my.model.gguf`` -> ``my.model``."""
    stem = re.sub(r"\.gguf$", "", file_name, flags=re.IGNORECASE)
    return re.sub(r"\.\d+-\d+$", "", stem)


@dataclass(frozen=True)
class Found:
    """One stage that answered on the LAN, as its announcement describes it.

    ``layers`` is half-open (``LayerRange``); ``addresses`` every address it announced, best first
    (on a subnet of this machine, not loopback); ``host`` the one to dial. ``address`` is
    ``host:port`` (``[v6]:port`` for IPv6) as ``--chain`` takes it."""

    name: str
    addresses: tuple[str, ...]
    port: int
    model_sha256: str
    layers: LayerRange
    n_layer: int
    arch: str
    protocol: int
    key_required: bool
    model_name: str = ""

    @property
    def host(self) -> str:
        return self.addresses[0]

    @property
    def address(self) -> str:
        return _join_host_port(self.host, self.port)

    def as_dict(self) -> dict:
        """JSON-ready: ``layer_start`` / ``layer_end`` half-open, ``layers`` inclusive text."""
        return {"name": self.name, "address": self.address, "addresses": list(self.addresses),
                "port": self.port, "model_sha256": self.model_sha256, "model_name": self.model_name,
                "layer_start": self.layers.start, "layer_end": self.layers.end,
                "layers": self.layers.inclusive(), "n_layer": self.n_layer, "arch": self.arch,
                "protocol": self.protocol, "key_required": self.key_required}


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---- the stage's side ---------------------------------------------------------------------

def _local_ipv4() -> list[tuple[str, int]]:
    """(address, prefix length) of every IPv4 address of this machine's interfaces."""
    import ifaddr

    out = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                out.append((ip.ip, int(ip.network_prefix)))
    return out


def announce_plan(host: str) -> tuple[list[str] | None, list[str]]:
    """Where a stage listening on ``host`` announces itself: ``(interfaces, addresses)``.

    ``interfaces`` are the IPv4 addresses whose interfaces carry the mDNS traffic (None: all);
    ``addresses`` the A records announced. A wildcard host (``0.0.0.0``, ``::``, empty) announces
    every non-loopback IPv4 address of the machine on every interface (127.0.0.1 when there is
    none); a loopback host announces itself on the loopback interface only (same-machine clients);
    any other host announces its own address on its own interface. Raises NakError when ``host``
    does not resolve to an IPv4 address.
    """
    if host.strip() in _WILDCARD:
        addrs = sorted({a for a, _ in _local_ipv4() if not ipaddress.ip_address(a).is_loopback})
        return None, addrs or ["127.0.0.1"]
    try:
        addr = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, IndexError, UnicodeError) as e:
        raise NakError(f"cannot announce --host {host} on the LAN: it has no IPv4 address ({e}); "
                       "LAN discovery is IPv4 only: listen on an IPv4 address or give clients --chain") from None
    if ipaddress.ip_address(addr).is_loopback:
        return ["127.0.0.1"], [addr]
    return [addr], [addr]


def _dns_label(text: str, limit: int = 40) -> str:
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return label[:limit].strip("-") or "stage"


def _open_mdns(interfaces: list[str] | None, fix: str) -> Any:
    """A ``zeroconf.Zeroconf`` on ``interfaces`` (None: all), IPv4. Raises NakError naming the
    interfaces and ``fix`` (what to do without discovery) when multicast DNS cannot be opened."""
    from zeroconf import InterfaceChoice, IPVersion, Zeroconf

    try:
        return Zeroconf(interfaces=interfaces or InterfaceChoice.All, ip_version=IPVersion.V4Only, use_asyncio=False)
    except (OSError, ValueError, RuntimeError) as e:
        raise NakError(f"cannot open multicast DNS (UDP 5353) on {interfaces or 'all interfaces'}: {e}; {fix}") from None


class Announcer:
    """Announce one stage with DNS-SD over mDNS (``_nakshatra._tcp``) until :meth:`close`.

    ``host``/``port``: where the stage listens (see :func:`announce_plan` for the addresses this
    announces). ``layers`` half-open; ``n_layer`` the whole model's layers; ``key_required``
    whether the stage holds a cluster key. :meth:`start` opens mDNS and registers in a background
    thread (probing for a unique name takes about 1.5 s, so the stage need not wait);
    ``on_registered(name)`` / ``on_error(exc)`` run in that thread. Also a context manager
    (``start(wait=True)`` ... ``close()``). Raises NakError: from the constructor when ``host`` has
    no IPv4 address; from :meth:`start` when mDNS cannot be opened (no multicast interface, UDP
    5353 unusable), or with ``wait`` when registration fails or takes over ``timeout_s``.
    """

    def __init__(self, *, host: str, port: int, model_sha256: str, layers: LayerRange, n_layer: int,
                 arch: str, key_required: bool, model_name: str = "", protocol: int | None = None,
                 on_registered: Callable[[str], None] | None = None,
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        self.host, self.port = host, int(port)
        self.properties = {
            "txtvers": str(TXT_VERSION), "model_sha256": model_sha256.lower(),
            "layer_start": str(layers.start), "layer_end": str(layers.end), "n_layer": str(n_layer),
            "arch": arch, "proto": str(_protocol_version() if protocol is None else protocol),
            "key": "1" if key_required else "0", "name": model_name[:100],
        }
        self.layers = layers
        self.on_registered, self.on_error = on_registered, on_error
        self.interfaces, self.addresses = announce_plan(host)
        self.name = ""  # the instance name once registered (may get a suffix if taken)
        self.error: BaseException | None = None
        self.registered = threading.Event()
        self._zc = None
        self._info = None
        self._thread: threading.Thread | None = None
        self._closing = False

    def _service_info(self):
        import secrets

        from zeroconf import ServiceInfo

        hostname = socket.gethostname().split(".")[0] or "host"
        instance = f"{hostname} layers {self.layers.inclusive()} port {self.port}"
        instance = instance.encode()[:63].decode(errors="ignore")
        # a server name of its own: machines (and network namespaces) often share a hostname, and
        # a shared name would merge their address records
        server = f"{_dns_label(hostname)}-nak{self.port}-{secrets.token_hex(3)}.local."
        return ServiceInfo(SERVICE_TYPE, f"{instance}.{SERVICE_TYPE}", port=self.port,
                           properties=self.properties, server=server,
                           addresses=[socket.inet_aton(a) for a in self.addresses])

    def start(self, wait: bool = False, timeout_s: float = 10.0) -> Announcer:
        """Open mDNS and register (in a background thread; with ``wait``, block until registered,
        up to ``timeout_s`` seconds, and raise NakError if that failed). Returns self."""
        self._zc = _open_mdns(self.interfaces, "clients then need --chain")
        self._info = self._service_info()
        self._thread = threading.Thread(target=self._register, name="nak-announce", daemon=True)
        self._thread.start()
        if wait:
            if not self.registered.wait(timeout_s) or self.error:
                raise NakError(f"could not announce on the LAN: {self.error or 'registration timed out'}")
        return self

    def _register(self) -> None:
        try:
            self._zc.register_service(self._info, allow_name_change=True)
            self.name = self._info.name
            self.registered.set()
            if self.on_registered and not self._closing:
                self.on_registered(self.name)
        except BaseException as e:  # noqa: BLE001 - reported, never fatal to the stage
            self.error = e
            self.registered.set()
            if self.on_error and not self._closing:
                self.on_error(e)

    def close(self) -> None:
        """Withdraw the announcement (an mDNS goodbye: browsers drop it at once) and close mDNS.
        Idempotent; takes about 0.3 s."""
        self._closing = True
        zc, self._zc = self._zc, None
        if zc is not None:
            try:
                zc.close()  # unregisters every service it registered: goodbye packets
            except Exception:  # noqa: BLE001 - stopping anyway
                pass
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None

    def __enter__(self) -> Announcer:
        return self.start(wait=True)

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- the client's side --------------------------------------------------------------------

def _parse(name: str, info, local_nets: Sequence[ipaddress.IPv4Network]) -> Found:
    """A Found from a resolved ServiceInfo; raises ValueError naming what is wrong."""
    props = {k.decode(errors="replace"): (v.decode(errors="replace") if v is not None else "")
             for k, v in (info.properties or {}).items()}

    def num(key: str) -> int:
        try:
            return int(props[key])
        except (KeyError, ValueError):
            raise ValueError(f"TXT {key}={props.get(key)!r} is not a number") from None

    sha = props.get("model_sha256", "").lower()
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise ValueError(f"TXT model_sha256={sha!r} is not a sha256")
    start, end, n_layer = num("layer_start"), num("layer_end"), num("n_layer")
    if not 0 <= start < end <= n_layer:
        raise ValueError(f"TXT layer_start={start} layer_end={end} n_layer={n_layer} is not a range of the model")
    if not info.port:
        raise ValueError("no port in its SRV record")
    addrs = list(dict.fromkeys(info.parsed_scoped_addresses()))
    if not addrs:
        raise ValueError("no address records")

    def rank(a: str) -> tuple[int, int, int]:
        ip = ipaddress.ip_address(a.split("%")[0])
        near = any(ip in net for net in local_nets) if ip.version == 4 else False
        return (0 if near else 1, 1 if ip.is_loopback else 0, 0 if ip.version == 4 else 1)

    addrs.sort(key=rank)
    return Found(name=name.removesuffix("." + SERVICE_TYPE), addresses=tuple(addrs), port=int(info.port),
                 model_sha256=sha, layers=LayerRange(start, end), n_layer=n_layer, arch=props.get("arch", ""),
                 protocol=num("proto"), key_required=props.get("key", "0") == "1",
                 model_name=props.get("name", ""))


class Browser:
    """A live view of the stages announcing on the LAN (a context manager).

    ``interfaces``: IPv4 addresses of the interfaces to listen on (None: all). :meth:`found`
    returns the stages currently announced; a stage that stops with a goodbye drops out at once.
    ``skipped`` lists ``(name, reason)`` of announcements that could not be read. Raises NakError
    when mDNS cannot be opened.
    """

    def __init__(self, interfaces: Sequence[str] | None = None) -> None:
        self.interfaces = list(interfaces) if interfaces else None
        self.skipped: list[tuple[str, str]] = []
        self._names: set[str] = set()
        self._lock = threading.Lock()
        self._zc = None
        self._browser = None

    def __enter__(self) -> Browser:
        from zeroconf import DNSQuestionType, ServiceBrowser

        self._zc = _open_mdns(self.interfaces, "give the stages with --chain instead")
        # QM questions only. A first question with the QU bit (python-zeroconf's default) asks for a
        # unicast answer to port 5353, and a host where several mDNS sockets share that port (this
        # process's announcer, another stage, avahi, mDNSResponder) hands a unicast datagram to
        # just one of them: the answer then reaches another socket and this browser hears nothing
        # until its next question, a second later. Multicast answers reach every socket.
        self._browser = ServiceBrowser(self._zc, SERVICE_TYPE, handlers=[self._on_change],
                                       question_type=DNSQuestionType.QM)
        return self

    def _on_change(self, zeroconf, service_type: str, name: str, state_change) -> None:
        from zeroconf import ServiceStateChange

        with self._lock:
            if state_change is ServiceStateChange.Removed:
                self._names.discard(name)
            else:
                self._names.add(name)

    def found(self, resolve_timeout_s: float = 1.0) -> list[Found]:
        """The stages announced now, sorted by model, layer range and address. Resolves each
        announcement (usually from cache; at most ``resolve_timeout_s`` seconds for one that is
        not complete yet)."""
        from zeroconf import DNSQuestionType, ServiceInfo

        with self._lock:
            names = sorted(self._names)
        nets = [ipaddress.ip_network(f"{a}/{p}", strict=False) for a, p in _local_ipv4()
                if not ipaddress.ip_address(a).is_loopback]
        out, skipped = [], []
        for name in names:
            info = ServiceInfo(SERVICE_TYPE, name)
            # QM for the reason given in __enter__
            if not info.request(self._zc, resolve_timeout_s * 1000, question_type=DNSQuestionType.QM):
                skipped.append((name, f"did not resolve within {resolve_timeout_s:g} s"))
                continue
            try:
                out.append(_parse(name, info, nets))
            except ValueError as e:
                skipped.append((name, str(e)))
        self.skipped = skipped
        return sorted(out, key=lambda f: (f.model_sha256, f.layers.start, f.layers.end, f.address))

    def close(self) -> None:
        if self._browser is not None:
            self._browser.cancel()
            self._browser = None
        if self._zc is not None:
            self._zc.close()
            self._zc = None

    def __exit__(self, *exc: object) -> None:
        self.close()


def discover(timeout_s: float = DEFAULT_TIMEOUT_S, model_sha256: str | None = None,
             interfaces: Sequence[str] | None = None) -> list[Found]:
    """The stages that answer on the LAN within ``timeout_s`` seconds (blocks that long).

    ``model_sha256``: keep only stages of that model (a hex prefix is enough, any case).
    ``interfaces``: IPv4 addresses of the interfaces to ask on (None: all, loopback included).
    From async code call it in a thread (``await asyncio.to_thread(discover, ...)``).
    Raises NakError when ``timeout_s`` is under ``MIN_TIMEOUT_S`` (1.5 s: shorter can miss a stage
    that answered someone else within the last second) or mDNS cannot be opened.
    """
    if not timeout_s >= MIN_TIMEOUT_S:
        raise NakError(f"discovery timeout {timeout_s} s is too short: a stage that answered another client "
                       f"within the last second waits a second before answering again (RFC 6762), so listen "
                       f"at least {MIN_TIMEOUT_S:g} s")
    with Browser(interfaces) as b:
        time.sleep(timeout_s)
        found = b.found()
    if model_sha256:
        want = model_sha256.strip().lower()
        found = [f for f in found if f.model_sha256.startswith(want)]
    return found


@dataclass
class _Model:
    sha: str
    stages: list[Found] = field(default_factory=list)

    def describe(self) -> str:
        names = sorted({s.model_name for s in self.stages if s.model_name})
        n_layer = max(s.n_layer for s in self.stages)
        what = ", ".join([*names, f"{n_layer} layers", f"{len(self.stages)} stage{'s' * (len(self.stages) != 1)}"])
        return f"{self.sha[:12]} ({what})"


def _spans(layers: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted layer numbers as inclusive spans: [3, 4, 5, 9] -> [(3, 5), (9, 9)]."""
    out: list[tuple[int, int]] = []
    for x in layers:
        if out and out[-1][1] == x - 1:
            out[-1] = (out[-1][0], x)
        else:
            out.append((x, x))
    return out


def _missing_text(spans: Sequence[tuple[int, int]]) -> str:
    parts = [f"{a}" if a == b else f"{a}-{b}" for a, b in spans]
    several = len(spans) > 1 or spans[0][0] != spans[0][1]
    joined = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"layer{'s' if several else ''} {joined} {'are' if several else 'is'}"


def _ranges_text(stages: Sequence[Found]) -> str:
    by_range: dict[LayerRange, list[str]] = {}
    for s in stages:
        by_range.setdefault(s.layers, []).append(s.address)
    return "; ".join(f"{r.inclusive()} at {', '.join(a)}" for r, a in sorted(by_range.items()))


def chain_from(found: Sequence[Found], model_sha256: str | None = None) -> list[str]:
    """Pick from ``found`` the stages of one model whose layer ranges join from layer 0 to the
    last: the fewest ranges (fewest network hops), then the most stages (replicas); every stage of
    a chosen range is returned (replicas, as ``--chain`` takes them). Returns ``host:port``
    addresses in layer order.

    Raises NakError: nothing answered; several models answered and ``model_sha256`` (a hex
    prefix) does not pick one (the error names them); some layers are served by no stage
    (``layers 10-19 are served by no stage that answered``); ranges that cover every layer but do
    not join end to end; stages of another protocol version.
    """
    if not found:
        raise NakError("no Nakshatra stage answered on the LAN: start stages with `nak serve ... --host "
                       "<LAN address>` (or --announce on loopback), check that multicast DNS (UDP 5353) "
                       "passes between the hosts, or give --chain host:port,...")
    models: dict[str, _Model] = {}
    for f in found:
        models.setdefault(f.model_sha256, _Model(f.model_sha256)).stages.append(f)
    listing = "; ".join(m.describe() for m in models.values())
    if model_sha256:
        want = model_sha256.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{1,64}", want):
            raise NakError(f"--model-sha {model_sha256!r} is not a hex sha256 (or a prefix of one)")
        picked = [m for sha, m in models.items() if sha.startswith(want)]
        if not picked:
            raise NakError(f"no stage of model {want[:12]} answered; models that answered: {listing}")
        if len(picked) > 1:
            raise NakError(f"--model-sha {want} matches several models: "
                           f"{'; '.join(m.describe() for m in picked)}; give more of the sha256")
        model = picked[0]
    elif len(models) > 1:
        raise NakError(f"stages of {len(models)} models answered: {listing}; pick one with --model-sha HEX")
    else:
        model = next(iter(models.values()))

    proto = _protocol_version()
    stages = [s for s in model.stages if s.protocol == proto]
    other_proto = [s for s in model.stages if s.protocol != proto]
    n_layer = max(s.n_layer for s in model.stages)
    if any(s.n_layer != n_layer for s in model.stages):
        raise NakError(f"stages of model {model.sha[:12]} disagree on its layer count: "
                       + "; ".join(f"{s.address}: {s.n_layer}" for s in model.stages))
    note = ""
    if other_proto:
        note = (f"; left out, speaking another protocol than this client's v{proto}: "
                + ", ".join(f"{s.address} (v{s.protocol})" for s in other_proto))

    by_range: dict[LayerRange, list[Found]] = {}
    for s in stages:
        by_range.setdefault(s.layers, []).append(s)
    # fewest ranges from 0 to n_layer, then most stages: a shortest path over range edges
    best: dict[int, tuple[int, int, tuple[LayerRange, ...]]] = {0: (0, 0, ())}
    for pos in range(n_layer):
        if pos not in best:
            continue
        hops, neg, path = best[pos]
        for r, group in sorted(by_range.items()):
            if r.start != pos:
                continue
            cand = (hops + 1, neg - len(group), path + (r,))
            if r.end not in best or cand < best[r.end]:
                best[r.end] = cand
    answered = f"model {model.describe()}: {_ranges_text(stages) or 'none usable'}"
    if n_layer not in best:
        covered = {x for r in by_range for x in range(r.start, r.end)}
        missing = [x for x in range(n_layer) if x not in covered]
        if missing:
            spans = _spans(missing)
            a, b = spans[0]
            raise NakError(f"{_missing_text(spans)} served by no stage that answered ({answered}{note}); "
                           f"start a stage for them, e.g. nak serve MODEL --layers {a}-{b} --host <LAN address>")
        stuck = max(best)
        raise NakError(f"the stages that answered cover every layer but their ranges do not join: none starts "
                       f"at layer {stuck} ({answered}{note}); cut the model at the same layers on every stage")
    return [s.address for r in best[n_layer][2] for s in sorted(by_range[r], key=lambda f: f.address)]


def discover_chain(timeout_s: float = DEFAULT_TIMEOUT_S, model_sha256: str | None = None,
                   interfaces: Sequence[str] | None = None) -> list[str]:
    """The ``--chain`` addresses (``host:port``, layer order, replicas included) of the stages
    that answer on the LAN within ``timeout_s`` seconds: :func:`discover` then :func:`chain_from`.

    Blocks ``timeout_s`` seconds (from async code: ``await asyncio.to_thread(discover_chain)``).
    Raises NakError when the chain is incomplete (naming the missing layers), when several models
    answer and ``model_sha256`` does not pick one (naming them), or when mDNS cannot be opened.
    """
    found = [_reachable_first(f) for f in discover(timeout_s, interfaces=interfaces)]
    return chain_from(found, model_sha256)


def _reachable_first(f: Found, timeout_s: float = 0.5) -> Found:
    """``f`` with the first address that accepts a TCP connection moved to the front (a stage on
    a wildcard address announces every address of its machine; only some may be reachable from
    here). A stage with one address is not probed; one that nothing reaches is left as it is."""
    if len(f.addresses) < 2:
        return f
    for a in f.addresses:
        try:
            with socket.create_connection((a.split("%")[0], f.port), timeout=timeout_s):
                pass
        except OSError:
            continue
        return replace(f, addresses=(a, *(x for x in f.addresses if x != a)))
    return f


def announce_stage(host: str, port: int, model_sha256: str, layers: LayerRange, n_layer: int, arch: str,
                   key_required: bool, model_file: str = "") -> Announcer | None:
    """Start announcing a stage for ``nak serve`` (returns at once; registration finishes in the
    background, then one line on stderr names the announcement). Any failure is one warning
    line on stderr and None: the stage still serves clients that give ``--chain``."""
    def say(text: str) -> None:
        print(f"nak serve: {text}", file=sys.stderr, flush=True)

    def registered(name: str) -> None:
        say(f"announced on the LAN as {name.removesuffix('.' + SERVICE_TYPE)!r} (_nakshatra._tcp, "
            f"{', '.join(a.addresses)} port {port})")

    try:
        a = Announcer(host=host, port=port, model_sha256=model_sha256, layers=layers, n_layer=n_layer,
                      arch=arch, key_required=key_required, model_name=model_display_name(model_file),
                      on_registered=registered,
                      on_error=lambda e: say(f"WARNING: could not announce on the LAN ({e}); clients need --chain"))
        return a.start()
    except NakError as e:
        say(f"WARNING: {e}")
        return None
