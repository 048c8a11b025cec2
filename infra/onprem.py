"""On-prem hall (`fleet:onprem:Hall`): validated power and fabric, and each bare-metal host registered via Redfish.

`BareMetalHost` is a Pulumi dynamic resource. Its provider talks to the host's BMC with the `sushy`
client library: create reads the system (serial, model, power state) and, when the hall asks, sets a
one-time PXE boot and powers the host on; diff compares the BMC's live power state and boot target with
what the host should be (drift shows in `pulumi preview`); update powers a managed host back on; delete
powers it off when asked; read refreshes it.

Two things about where the provider runs shape this module:

- Pulumi pickles the provider object with dill and runs it in a separate process
  (`python -m pulumi.dynamic`). dill pickles `BareMetalHostProvider` by reference to this module
  (pulumi issue 7453: classes outside `__main__` are not captured by value), so that process imports
  `infra.onprem`: importing it must have no side effects, and the provider holds no state but plain
  values. The provider process only needs `sushy`; it is imported there, not by the program.
- The BMC password never enters the resource: not its inputs, not its outputs, not the pickled
  provider. The provider reads the secret stack config `fleet:bmcPassword` in `configure`, which Pulumi
  calls in the provider process with the stack's configuration.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pulumi
from pulumi.dynamic import (
    CheckFailure,
    CheckResult,
    ConfigureRequest,
    CreateResult,
    DiffResult,
    ReadResult,
    ResourceProvider,
    UpdateResult,
)

from infra.model.errors import InputError, Problem
from infra.model.fleet import Fleet, Host, OnpremSite
from infra.model.power import PowerReport, validate_hall

PASSWORD_KEY = "fleet:bmcPassword"
REDFISH_ROOT = "/redfish/v1"
# inputs whose change means another machine: replace (delete, then create) rather than update
IDENTITY_INPUTS = ("endpoint", "system_id")
READ_OUTPUTS = ("system_path", "serial_number", "model", "manufacturer", "uuid", "power_state", "boot_target")


class BareMetalHostProvider(ResourceProvider):
    """CRUD for one bare-metal host behind a Redfish BMC."""

    def __init__(self) -> None:
        super().__init__()
        self._password: str | None = None

    def configure(self, req: ConfigureRequest) -> None:
        """Take the BMC password from the stack's secret config (called in the provider process)."""
        self._password = req.config.get(PASSWORD_KEY)

    def check(self, _olds: dict[str, Any], news: dict[str, Any]) -> CheckResult:
        """Refuse inputs no BMC call could work with, before anything is touched."""
        failures = []
        endpoint = news.get("endpoint")
        if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
            failures.append(CheckFailure("endpoint", f"must be an http(s) URL of the BMC, got {endpoint!r}"))
        if not news.get("username"):
            failures.append(CheckFailure("username", "required"))
        timeout = news.get("timeout_s", 300)
        if not isinstance(timeout, int | float) or timeout <= 0:
            failures.append(CheckFailure("timeout_s", f"must be a positive number of seconds, got {timeout!r}"))
        if "password" in news:
            failures.append(CheckFailure("password", f"never an input: set it with `pulumi config set --secret "
                                                     f"{PASSWORD_KEY}`"))
        return CheckResult(news, failures)

    def diff(self, _id: str, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        """Another endpoint or system id is another machine: replace; other inputs only update. The machine as the
        BMC reports it now counts too (`drift`): a host powered off out of band is a change `pulumi preview`
        shows, and `update` acts on."""
        inputs = sorted(k for k in {*olds, *news} if not k.startswith("__") and k not in READ_OUTPUTS)
        changed = [k for k in inputs if olds.get(k) != news.get(k)]
        replaces = [k for k in changed if k in IDENTITY_INPUTS]
        drifted = [] if replaces else self.drift(olds, news)
        return DiffResult(changes=bool(changed or drifted), replaces=replaces, delete_before_replace=True)

    def drift(self, olds: dict[str, Any], news: dict[str, Any]) -> list[str]:
        """The read outputs whose live value differs from what the host should be: its power state from `power_on`
        when the hall manages power (else from what was recorded), its boot target from what was recorded. A BMC
        that cannot be asked shows no drift here: `pulumi refresh` (read) says what it is."""
        try:
            system = self._system(news)
        except Exception:
            return []
        live = {"power_state": _value(system.power_state), "boot_target": _boot_target(system)}
        want = {"power_state": "On" if news.get("power_on") else olds.get("power_state"),
                "boot_target": olds.get("boot_target")}
        return [k for k in live if k in olds and want[k] is not None and live[k] != want[k]]

    def create(self, props: dict[str, Any]) -> CreateResult:
        """Read the system; set a one-time PXE boot and power on when asked, waiting until the BMC reports On."""
        system = self._system(props)
        if props.get("pxe_once"):
            import sushy

            system.set_system_boot_options(sushy.BootSource.PXE, enabled=sushy.BootSourceOverrideEnabled.ONCE)
        if props.get("power_on"):
            self._power(system, on=True, timeout=float(props.get("timeout_s", 300)))
        return CreateResult(self._id(props, system), self._outs(props, system))

    def read(self, id_: str, props: dict[str, Any]) -> ReadResult:
        """Refresh from the BMC; a system the BMC no longer has is gone (empty id)."""
        import sushy

        try:
            system = self._system(props)
        except sushy.exceptions.ResourceNotFoundError:
            return ReadResult("", {})
        return ReadResult(id_, self._outs(props, system))

    def update(self, _id: str, _olds: dict[str, Any], news: dict[str, Any]) -> UpdateResult:
        """Power the host back on when the hall manages its power (`power_on`) and it is off (powered off out of
        band); other changes (knobs, a boot target the BMC reset) need nothing on the machine: re-read it."""
        system = self._system(news)
        if news.get("power_on"):
            self._power(system, on=True, timeout=float(news.get("timeout_s", 300)))
        return UpdateResult(self._outs(news, system))

    def delete(self, _id: str, props: dict[str, Any]) -> None:
        """Forget the host; power it off first when asked (graceful, then forced if it does not go down)."""
        if not props.get("power_off_on_delete"):
            return
        import sushy

        try:
            system = self._system(props)
        except sushy.exceptions.ResourceNotFoundError:
            return
        self._power(system, on=False, timeout=float(props.get("timeout_s", 300)))

    def _connect(self, props: dict[str, Any]) -> Any:
        import sushy

        endpoint = str(props["endpoint"]).rstrip("/")
        base = endpoint if endpoint.endswith(REDFISH_ROOT) else endpoint + REDFISH_ROOT
        return sushy.Sushy(base, username=props.get("username"), password=self._password,
                           verify=bool(props.get("verify_tls", True)),
                           # a BMC answering 5xx is retried, but not for sushy's default 30 s per call
                           server_side_retries=3, server_side_retries_delay=2)

    def _system(self, props: dict[str, Any]) -> Any:
        conn = self._connect(props)
        system_id = props.get("system_id")
        if system_id:
            return conn.get_system(f"{REDFISH_ROOT}/Systems/{system_id}")
        members = sorted(conn.get_system_collection().members_identities)
        if len(members) != 1:
            raise RuntimeError(f"BMC {props['endpoint']} has {len(members)} systems {members}: set bmc.system_id")
        return conn.get_system(members[0])

    def _power(self, system: Any, on: bool, timeout: float) -> None:
        import sushy

        want = sushy.PowerState.ON if on else sushy.PowerState.OFF
        if system.power_state == want:
            return
        # A BMC accepts the reset and applies it seconds later: poll until it reports the new state.
        attempts = [sushy.ResetType.ON] if on else [sushy.ResetType.GRACEFUL_SHUTDOWN, sushy.ResetType.FORCE_OFF]
        for i, reset in enumerate(attempts):
            system.reset_system(reset)
            last = i == len(attempts) - 1
            budget = timeout if last else timeout / 2
            if _poll(system, want, budget):
                return
        raise TimeoutError(f"{system.path}: power state still {_value(system.power_state)} after {timeout:g}s, "
                           f"wanted {want.value}")

    @staticmethod
    def _id(props: dict[str, Any], system: Any) -> str:
        return str(props["endpoint"]).rstrip("/") + system.path

    @staticmethod
    def _outs(props: dict[str, Any], system: Any) -> dict[str, Any]:
        read = {
            "system_path": system.path,
            "serial_number": system.serial_number,
            "model": system.model,
            "manufacturer": system.manufacturer,
            "uuid": system.uuid,
            "power_state": _value(system.power_state),
            "boot_target": _boot_target(system),
        }
        return {**{k: v for k, v in props.items() if not k.startswith("__")}, **read}


def _poll(system: Any, want: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        system.refresh(force=True)
        if system.power_state == want:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(1.0)


def _boot_target(system: Any) -> Any:
    boot = getattr(system, "boot", None)
    return _value(boot.target) if boot is not None else None


def _value(enum_or_none: Any) -> Any:
    return getattr(enum_or_none, "value", enum_or_none)


@dataclass(frozen=True)
class BareMetalHostArgs:
    """What the provider needs to reach a host's BMC, and what it may do to the host."""

    host: str
    endpoint: str
    username: str
    system_id: str | None = None
    verify_tls: bool = True
    pxe_once: bool = False
    power_on: bool = False
    power_off_on_delete: bool = False
    timeout_s: int = 300


class BareMetalHost(pulumi.dynamic.Resource, module="fleet", name="BareMetalHost"):
    """A bare-metal host registered through its BMC (Redfish); type `pulumi-python:dynamic/fleet:BareMetalHost`."""

    system_path: pulumi.Output[str]
    serial_number: pulumi.Output[str | None]
    model: pulumi.Output[str | None]
    manufacturer: pulumi.Output[str | None]
    uuid: pulumi.Output[str | None]
    power_state: pulumi.Output[str]
    boot_target: pulumi.Output[str | None]

    def __init__(self, name: str, args: BareMetalHostArgs, opts: pulumi.ResourceOptions | None = None):
        props: dict[str, Any] = {k: v for k, v in vars(args).items() if v is not None}
        props |= dict.fromkeys(READ_OUTPUTS)
        super().__init__(BareMetalHostProvider(), name, props, opts)


@dataclass
class HallArgs:
    """One on-prem site of a fleet: its hosts are the fleet's hosts in pools at this site."""

    fleet: Fleet
    site: OnpremSite


class Hall(pulumi.ComponentResource):
    """`fleet:onprem:Hall`: power and fabric validated at preview, then one BareMetalHost per host with a BMC."""

    hosts: dict[str, BareMetalHost]
    endpoints: dict[str, pulumi.Output[dict[str, Any]]]
    report: PowerReport

    def __init__(self, name: str, args: HallArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("fleet:onprem:Hall", name, None, opts)
        fleet, site = args.fleet, args.site
        members = [h for h in fleet.hosts.values() if fleet.site_of(h).name == site.name]
        self.report = validate_hall(fleet, site)
        for line in self.report.lines:
            pulumi.log.info(line, resource=self)
        if self.report.loads and not self.report.n_plus_one:
            pulumi.log.warn(f"{site.name}: one UPS failing would overload another (N+1 does not hold)", resource=self)
        _require_bmc_secret(fleet, [h for h in members if h.bmc])

        self.hosts = {}
        self.endpoints = {}
        for host in members:
            address = _address(host)
            if host.bmc is None:
                self.endpoints[host.name] = pulumi.Output.from_input({"address": address})
                continue
            bmh = BareMetalHost(host.name, BareMetalHostArgs(
                host=host.name,
                endpoint=host.bmc.endpoint,
                username=host.bmc.username,
                system_id=host.bmc.system_id,
                verify_tls=host.bmc.verify_tls,
                pxe_once=site.bmc_pxe_once_on_create,
                power_on=site.bmc_power_on_create,
                power_off_on_delete=site.bmc_power_off_on_delete,
            ), pulumi.ResourceOptions(parent=self))
            self.hosts[host.name] = bmh
            # listed in the inventory once its BMC answered: the address itself is the configured one
            self.endpoints[host.name] = bmh.id.apply(_endpoint(address))
        self.register_outputs({
            "hosts": {name: h.id for name, h in self.hosts.items()},
            "n_plus_one": self.report.n_plus_one,
        })


def _endpoint(address: str):
    def endpoint(_id: str) -> dict[str, Any]:
        return {"address": address}

    return endpoint


def _address(host: Host) -> str:
    assert host.address, "the fleet model requires an address for on-prem hosts"
    return host.address


def _require_bmc_secret(fleet: Fleet, hosts: list[Host]) -> None:
    if not hosts:
        return
    field = f"config.{PASSWORD_KEY}"
    if pulumi.Config("fleet").get_secret("bmcPassword") is None:
        raise InputError([Problem(fleet.source, field, None,
                                  f"required for the BMCs of {', '.join(h.name for h in hosts)}: "
                                  f"pulumi config set --secret {PASSWORD_KEY} ...")])
    if not pulumi.runtime.is_config_secret(PASSWORD_KEY):
        raise InputError([Problem(fleet.source, field, None,
                                  f"stored in plain text: set it again with `pulumi config set --secret "
                                  f"{PASSWORD_KEY} ...`")])
