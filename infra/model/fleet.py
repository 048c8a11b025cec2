"""The fleet model: sites, pools and hosts, read from a Pulumi stack file's `fleet:` config.

A stack file (`Pulumi.<stack>.yaml`) holds, under `config:`, the keys `fleet:sites`, `fleet:pools`
and `fleet:hosts`. Cloud pools (`aws`, `outpost`) may give a `count` instead of listing hosts: their
hosts are named `<pool>-<index>` and get their addresses from the resources Pulumi creates.
This module does not import Pulumi, so the patch pipeline and the lab can read a fleet too.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from infra.model.access import ip_or_dns_name, parse_public_key
from infra.model.amount import NonZeroAmount
from infra.model.errors import InputError, Problem, field_path, load_yaml, nearest
from infra.model.strict import StrictModel, validate

NAME = r"^[a-z0-9][a-z0-9-]{0,62}$"
Name = Annotated[str, Field(pattern=NAME)]

# 8-GPU SXM boards whose GPUs talk through NVSwitch: they need fabric manager and libnvidia-nscq.
MAX_POOL_COUNT = 10_000  # instances a cloud pool may ask for: a typo beyond this would hang the planner
USER = r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$"  # a login name: useradd's rules, and nothing a shell would split
S3_BUCKET = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"
NVSWITCH_GPUS = ("A100-SXM4-40GB", "A100-SXM4-80GB", "H100-SXM5-80GB", "H200-SXM5-141GB")
GPU_MEMORY_MIB = {
    "A100-SXM4-40GB": 40960,
    "A100-SXM4-80GB": 81920,
    "H100-SXM5-80GB": 81559,
    "H200-SXM5-141GB": 143771,
    "T4": 15360,
    "A10G": 23028,
}


class Ups(StrictModel):
    """One UPS unit, reached through NUT's upsd."""

    name: Name
    host: str
    port: int = Field(3493, ge=1, le=65535)
    capacity_w: int = Field(gt=0, description="nameplate real-power capacity, watts")


class Psu(StrictModel):
    """One power supply of a host and the feed/UPS it hangs on."""

    feed: Literal["A", "B"]
    ups: Name


class IbHca(StrictModel):
    """One InfiniBand HCA port and where it is cabled."""

    name: str = Field(pattern=r"^mlx5_\d+$")
    guid: str = Field(pattern=r"^0x[0-9a-f]{16}$")
    switch: Name
    port: int = Field(ge=1, le=128)
    rate: Literal[100, 200, 400, 800]


class Bmc(StrictModel):
    """The host's baseboard management controller (Redfish)."""

    endpoint: str = Field(pattern=r"^https?://")
    system_id: str | None = None
    username: str = "admin"
    verify_tls: bool = True


# Canonical's SSM public parameter for the current Ubuntu 22.04 LTS server image (amd64, EBS gp2 root)
CANONICAL_UBUNTU_2204 = "/aws/service/canonical/ubuntu/server/22.04/stable/current/amd64/hvm/ebs-gp2/ami-id"


class AmiLookup(StrictModel):
    """The machine image of a site's instances: an AMI `id`, else an exact AMI `name` from `owner`, else the
    image an SSM public parameter names (the default: Canonical's current Ubuntu 22.04 LTS; AWS publishes its
    Deep Learning Base GPU AMIs the same way, under /aws/service/deeplearning/).

    A parameter's image moves when its publisher releases a new one: each `pulumi up` resolves it, so instances
    launched from then on start from the current image; running instances keep theirs (they launch from their
    template's "$Default" version, and a template change never replaces one), and the bundle decides what runs
    on them. The resolved id is a stack output (`amis`). A name search misses deprecated images (AWS deprecates
    AMIs two years after creation by default): a dated public name stops resolving, so names are for images
    you own, exact (no wildcards). An id is found even once deprecated.
    """

    owner: str = Field(default="099720109477", description="the owner a `name` is looked up under (Canonical)")
    ssm_parameter: str | None = Field(default=CANONICAL_UBUNTU_2204, pattern=r"^/[A-Za-z0-9_./-]+$",
                                      description="an SSM parameter whose value is the AMI id")
    name: str | None = None
    id: str | None = Field(default=None, pattern=r"^ami-[0-9a-f]{8,17}$")

    @field_validator("name")
    @classmethod
    def _pinned(cls, value: str | None) -> str | None:
        if value is not None and any(c in value for c in "*?"):
            raise ValueError("must be an exact AMI name (no wildcards): pin the image, bump it on purpose")
        return value


class Bastion(StrictModel):
    """The jump host a cloud site's private hosts are reached through, and its host keys as the operator knows
    them (from the bastion's own console output or its image build): the controller never trusts it on first use."""

    host: str = Field(description="IP address or DNS name the controller reaches the bastion at")
    port: int = Field(22, ge=1, le=65535)
    user: str = Field(pattern=USER)
    host_keys: list[str] = Field(description='its public host keys, "ssh-ed25519 AAAA..." (a comment is dropped)')

    @field_validator("host")
    @classmethod
    def _address(cls, value: str) -> str:
        return ip_or_dns_name(value)

    @field_validator("host_keys")
    @classmethod
    def _keys(cls, value: list[str]) -> list[str]:
        keys = []
        for i, text in enumerate(value):
            try:
                kind, blob = parse_public_key(text)
            except ValueError as exc:
                raise ValueError(f"host_keys[{i}]: {exc}") from exc
            keys.append(f"{kind} {blob}")
        return keys


class Access(StrictModel):
    """How the controller reaches a cloud site's hosts: `direct` (SSH to the private address: the controller is in
    the VPC or routed into it), `bastion` (SSH through the site's jump host, a ProxyCommand) or `ssm` (AWS Systems
    Manager Session Manager, the amazon.aws collection's `aws_ssm` connection: no SSH at all, files through an S3
    bucket). Host keys are checked against `known_hosts_file`, which `fleet known-hosts` fills."""

    via: Literal["direct", "bastion", "ssm"] = "direct"
    bastion: Bastion | None = None
    ssm_bucket: str | None = Field(None, pattern=S3_BUCKET,
                                   description="the S3 bucket the aws_ssm connection transfers files through")
    # no whitespace: ssh reads UserKnownHostsFile's value as a list of files
    known_hosts_file: str = Field("~/.ssh/known_hosts", pattern=r"^[^\s\"'\\]+$",
                                  description="the controller's known_hosts file the SSH arguments name")


class _Site(StrictModel):
    name: Name
    haproxy_api: str | None = Field(None, description="host:port of HAProxy's runtime API")
    artifacts_url: str | None = Field(None, description="base URL of the model-weights store")


class AwsSite(_Site):
    """An AWS site: region and zone, the VPC or existing subnets, the pinned AMI and GPU capacity."""

    kind: Literal["aws"]
    region: str
    availability_zone: str
    vpc_cidr: str = "10.42.0.0/16"
    subnet_ids: list[str] = []
    ssh_cidrs: list[str] = []
    capacity_reservation_id: str | None = None
    capacity_block: bool = False
    ami: AmiLookup = Field(default_factory=lambda: AmiLookup())
    root_volume_gb: int = Field(500, ge=8, le=16384)
    serving_cidrs: list[str] = Field([], description="clients allowed to the serving port besides the VPC")
    ssh_authorized_keys: list[str] = []
    default_user: str = Field("ubuntu", pattern=USER, description="the AMI's login user (Ubuntu's refuse root)")
    access: Access = Field(default_factory=lambda: Access())

    @field_validator("ssh_cidrs", "serving_cidrs")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            ipaddress.ip_network(cidr, strict=False)
        return value


class OutpostSite(_Site):
    """An AWS Outposts rack: instances in a subnet on the outpost, reached through its local gateway."""

    kind: Literal["outpost"]
    region: str
    availability_zone: str
    outpost_arn: str = Field(pattern=r"^arn:aws:outposts:[a-z0-9-]+:\d{12}:outpost/op-[0-9a-f]+$")
    local_gateway_route_table_id: str | None = None
    vpc_cidr: str = "10.43.0.0/16"
    ssh_cidrs: list[str] = []
    ami: AmiLookup = Field(default_factory=lambda: AmiLookup())
    root_volume_gb: int = Field(200, ge=8, le=16384)
    # Outposts racks have offered gp2 EBS; set gp3 where your rack lists it.
    root_volume_type: Literal["gp2", "gp3"] = "gp2"
    ssh_authorized_keys: list[str] = []
    default_user: str = Field("ubuntu", pattern=USER, description="the AMI's login user (Ubuntu's refuse root)")
    access: Access = Field(default_factory=lambda: Access())

    @field_validator("ssh_cidrs")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            ipaddress.ip_network(cidr, strict=False)
        return value


class OnpremSite(_Site):
    """A bare-metal site: its UPS units, power and rail rules, and what `pulumi up` may do through BMCs."""

    kind: Literal["onprem"]
    ups: list[Ups] = []
    ups_monitor_user: str | None = Field(
        None, min_length=1, description="upsd's account the hosts' upsmon logs in with (upsd.users); its password "
                                        "reaches Ansible as fleet_ups_monitor_password, from a vault, never here")
    ups_derating: float = Field(0.8, gt=0, le=1)
    require_n_plus_one: bool = False
    ib_rail_aligned: bool = False
    ib_rails: dict[str, str] = Field(
        {}, description="each leaf switch and its rail: the HCA name every host cables to it (mlx5_0, ...); "
                        "required when ib_rail_aligned")
    # What `pulumi up` may do to a bare-metal host through its BMC; all off: registering only reads.
    bmc_pxe_once_on_create: bool = False
    bmc_power_on_create: bool = False
    bmc_power_off_on_delete: bool = False

    @model_validator(mode="after")
    def _rails_declared(self) -> OnpremSite:
        if self.ib_rail_aligned and not self.ib_rails:
            raise ValueError("ib_rail_aligned needs ib_rails: each leaf switch and the HCA name (rail) cabled to it, "
                             "e.g. {leaf-rail0: mlx5_0}")
        return self


Site = Annotated[AwsSite | OutpostSite | OnpremSite, Field(discriminator="kind")]


class Host(StrictModel):
    """One server: its pool, SSH and serving endpoint, patch ring, BMC, power supplies and HCA cabling."""

    name: Name
    pool: Name
    address: str | None = Field(None, description="IP address or DNS name the controller reaches the host at")
    ssh_port: int = Field(22, ge=1, le=65535)
    ssh_user: str | None = Field(None, pattern=USER, description="default: root on-prem, the site's default_user "
                                                              "on a cloud site")
    serving_port: int | None = Field(None, ge=1, le=65535)
    patch_ring: int = Field(1, ge=0, le=9, description="0 = canary ring")
    bmc: Bmc | None = None
    psus: list[Psu] = []
    max_draw_w: int | None = Field(None, gt=0)
    ib_hcas: list[IbHca] = []

    @field_validator("address")
    @classmethod
    def _ip_or_dns_name(cls, value: str | None) -> str | None:
        return None if value is None else ip_or_dns_name(value)


class Pool(StrictModel):
    """Hosts of one site serving one model on one GPU type, with their disruption budget."""

    name: Name
    site: Name
    model: str = Field(description="the model id the pool serves, as /v1/models reports it")
    instance_type: str | None = None
    gpu_model: str
    gpu_count: int = Field(ge=1, le=16)
    serving_port: int = Field(8000, ge=1, le=65535)
    max_unavailable: NonZeroAmount = Field(1, description="hosts or percent ('25%') out at once")
    min_serving: int = Field(1, ge=0, description="capacity floor: hosts that must keep serving")
    count: int | None = Field(None, ge=0, le=MAX_POOL_COUNT, description="cloud pools: number of instances")

    @field_validator("gpu_model")
    @classmethod
    def _gpu(cls, value: str) -> str:
        if value not in GPU_MEMORY_MIB:
            guess = nearest(value, GPU_MEMORY_MIB)
            hint = f", did you mean {guess!r}?" if guess else ""
            raise ValueError(f"unknown GPU model{hint} (known: {', '.join(GPU_MEMORY_MIB)})")
        return value

    @property
    def nvswitch(self) -> bool:
        """Whether the pool's boards are 8-GPU NVSwitch systems (they need fabric manager and NSCQ)."""
        return self.gpu_model in NVSWITCH_GPUS and self.gpu_count == 8


class FleetConfig(StrictModel):
    """The `fleet:*` keys of a stack file, before cross-references are checked."""

    name: Name
    sites: list[Site]
    pools: list[Pool]
    hosts: list[Host] = []
    converge: bool = False
    bundle: str | None = Field(None, description="release file day-0 converge applies")


class Fleet:
    """A validated fleet: every reference resolves, every name is unique."""

    def __init__(self, config: FleetConfig, source: str = "<fleet>", prefix: str = ""):
        self.name = config.name
        self.source = source
        self.prefix = prefix
        self.config = config
        self.sites = {s.name: s for s in config.sites}
        self.pools = {p.name: p for p in config.pools}
        self.hosts = {h.name: h for h in _expand_hosts(config)}

    def site_of(self, host: Host) -> AwsSite | OutpostSite | OnpremSite:
        """The site a host is at, through its pool."""
        return self.sites[self.pools[host.pool].site]

    def ssh_user(self, host: Host) -> str:
        """The user Ansible logs in as: the host's own, else root on-prem and the AMI's default user on a cloud
        site (Ubuntu's AMIs refuse root and put the instance's keys on `ubuntu`)."""
        if host.ssh_user:
            return host.ssh_user
        site = self.site_of(host)
        return "root" if isinstance(site, OnpremSite) else site.default_user

    def pool_of(self, host: Host) -> Pool:
        """The pool a host belongs to."""
        return self.pools[host.pool]

    def serving_port(self, host: Host) -> int:
        """The host's serving port: its own, else its pool's."""
        return host.serving_port or self.pools[host.pool].serving_port

    def hosts_in(self, pool: str) -> list[Host]:
        """Every host of a pool, listed ones and those expanded from its `count`."""
        return [h for h in self.hosts.values() if h.pool == pool]

    def field(self, kind: Literal["sites", "pools", "hosts"], name: str, *parts: str | int) -> str:
        """The config path of a named site, pool or host, for error messages: 'config.fleet:hosts[3].psus'.

        Hosts expanded from a pool's `count` are not listed in the config; they point at the pool's count.
        """
        items = getattr(self.config, kind)
        for i, item in enumerate(items):
            if item.name == name:
                return self.prefix + field_path([kind, i, *parts])
        if kind == "hosts" and name in self.hosts:
            return self.field("pools", self.hosts[name].pool, "count")
        return self.prefix + field_path([kind, *parts])


def _expand_hosts(config: FleetConfig) -> list[Host]:
    hosts = list(config.hosts)
    listed = Counter(h.pool for h in hosts)
    for pool in config.pools:
        if pool.count and not listed[pool.name]:
            hosts += [Host(name=f"{pool.name}-{i}", pool=pool.name) for i in range(pool.count)]
    return hosts


def parse_fleet(data: Any, source: str = "<fleet>", prefix: str = "") -> Fleet:
    """Validate `fleet:` config data (a dict with name/sites/pools/hosts) into a Fleet."""
    config = validate(FleetConfig, data, source, "the fleet settings", prefix)
    problems = list(_cross_check(config, source, prefix))
    if problems:
        raise InputError(problems)
    return Fleet(config, source, prefix)


def _cross_check(config: FleetConfig, source: str, prefix: str) -> Iterable[Problem]:
    def p(parts: list[Any], value: Any, message: str) -> Problem:
        return Problem(source, prefix + field_path(parts), value, message)

    for kind, items in (("site", config.sites), ("pool", config.pools), ("host", config.hosts)):
        seen: dict[str, int] = {}
        for i, item in enumerate(items):
            if item.name in seen:
                yield p([f"{kind}s", i, "name"], item.name, f"duplicate {kind} name (first at index {seen[item.name]})")
            seen.setdefault(item.name, i)

    listed_hosts = {h.name: i for i, h in enumerate(config.hosts)}
    listed_pools = Counter(h.pool for h in config.hosts)
    for i, counted in enumerate(config.pools):  # names a pool's `count` generates must not shadow a listed host
        if counted.count and not listed_pools[counted.name]:
            for n in range(counted.count):
                if (clash := f"{counted.name}-{n}") in listed_hosts:
                    yield p(["pools", i, "count"], counted.count,
                            f"generates host {clash!r}, the name of hosts[{listed_hosts[clash]}]: rename one")

    for i, cloud in enumerate(config.sites):
        if isinstance(cloud, AwsSite | OutpostSite):
            yield from _access_problems(cloud.access, ["sites", i, "access"], p)

    sites = {s.name: s for s in config.sites}
    pools = {pl.name: pl for pl in config.pools}
    for i, listed in enumerate(config.pools):
        if listed.site not in sites:
            guess = nearest(listed.site, sites)
            yield p(["pools", i, "site"], listed.site,
                    "no such site" + (f", did you mean {guess!r}?" if guess else ""))
        elif sites[listed.site].kind != "onprem" and not listed.instance_type:
            yield p(["pools", i, "instance_type"], None, f"required for a pool on a {sites[listed.site].kind} site")

    endpoints: dict[tuple[str, int], str] = {}
    for i, host in enumerate(config.hosts):
        pool = pools.get(host.pool)
        if pool is None:
            guess = nearest(host.pool, pools)
            yield p(["hosts", i, "pool"], host.pool,
                    "no such pool" + (f", did you mean {guess!r}?" if guess else ""))
            continue
        site = sites.get(pool.site)
        if isinstance(site, OnpremSite):
            if not host.address:
                yield p(["hosts", i, "address"], None, "required for an on-prem host")
            units = {u.name for u in site.ups}
            for j, psu in enumerate(host.psus):
                if psu.ups not in units:
                    yield p(["hosts", i, "psus", j, "ups"], psu.ups, f"no such UPS at site {site.name!r}")
        if host.address:
            key = (host.address, host.serving_port or pool.serving_port)
            if key in endpoints:
                yield p(["hosts", i, "serving_port"], f"{key[0]}:{key[1]}",
                        f"serving address and port already used by host {endpoints[key]!r}")
            endpoints.setdefault(key, host.name)


def _access_problems(access: Access, at: list[Any], p: Any) -> Iterable[Problem]:
    if access.via == "bastion":
        if access.bastion is None:
            yield p([*at, "bastion"], None, "required when via is 'bastion': the jump host's host, user and "
                                            "host_keys")
        elif not access.bastion.host_keys:
            yield p([*at, "bastion", "host_keys"], [], "at least one public host key of the bastion "
                                                       "(\"ssh-ed25519 AAAA...\"): its first connection is "
                                                       "checked too, never trusted on first use")
    elif access.bastion is not None:
        yield p([*at, "bastion"], None, f"a bastion is used only with via: bastion (via is {access.via!r})")
    if access.via == "ssm" and not access.ssm_bucket:
        yield p([*at, "ssm_bucket"], None, "required when via is 'ssm': the S3 bucket the aws_ssm connection "
                                           "transfers files through")
    elif access.via != "ssm" and access.ssm_bucket:
        yield p([*at, "ssm_bucket"], access.ssm_bucket, f"used only with via: ssm (via is {access.via!r})")


def stack_file(stack: str, project_dir: str | Path = ".") -> Path:
    """Path of a stack's Pulumi stack file, `Pulumi.<stack>.yaml` in the project directory."""
    return Path(project_dir) / f"Pulumi.{stack}.yaml"


FLEET_KEYS = ("name", "sites", "pools", "hosts", "converge", "bundle")
# `fleet:*` keys that are not part of the fleet model: the Pulumi program reads them itself
# (`pulumi config set --secret fleet:bmcPassword ...` puts it in the stack file, encrypted).
PROGRAM_KEYS = ("bmcPassword",)


def load_stack(stack: str, project_dir: str | Path = ".") -> Fleet:
    """Read the fleet from `Pulumi.<stack>.yaml`'s `fleet:*` config keys."""
    path = stack_file(stack, project_dir)
    if not path.exists():
        raise InputError.single(path, "", stack, "no such stack file")
    doc = load_yaml(path)
    config = (doc or {}).get("config") if isinstance(doc, dict) else None
    if not isinstance(config, dict):
        raise InputError.single(path, "config", None, "the stack file has no config mapping")
    return parse_fleet(fleet_config_from_stack(config, path), str(path), "config.fleet:")


def fleet_config_from_stack(config: dict[str, Any], path: str | Path = "<stack>") -> dict[str, Any]:
    """Pick the `fleet:*` keys out of a stack's config mapping (`fleet:pools` -> `pools`)."""
    data: dict[str, Any] = {}
    problems = []
    for key, value in config.items():
        namespace, _, name = str(key).partition(":")
        if namespace != "fleet" or name in PROGRAM_KEYS:
            continue
        if name not in FLEET_KEYS:
            guess = nearest(name, FLEET_KEYS)
            hint = f" (did you mean 'fleet:{guess}'?)" if guess else ""
            problems.append(Problem(str(path), f"config.{key}", None, f"unknown key {key!r}{hint}"))
        data[name] = value
    if problems:
        raise InputError(problems)
    return data
