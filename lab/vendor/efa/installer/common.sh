# shellcheck shell=bash
# Fleet lab simulation of common.sh from AWS's EFA installer tarball: the helpers efa_installer.sh
# sources (root check, prompt, OS detection, package install/query/remove).
#
# AWS's helpers run `apt install -y`, `apt list --installed` and `apt -y remove|purge`; these do the
# same with apt-get and dpkg-query. With EFA_SIM_DPKG_ROOT set (the lab's unit tests only) they work on
# a dpkg root in that folder instead of the host: dpkg --root/--admindir, no root check.

EFA_SIM_DPKG_ROOT="${EFA_SIM_DPKG_ROOT:-}"

dpkg_root_args() {
	printf '%s\n' "--root=${EFA_SIM_DPKG_ROOT}" "--admindir=${EFA_SIM_DPKG_ROOT}/var/lib/dpkg" \
		"--force-not-root" "--force-script-chrootless"
}

is_root() {
	if [ -n "${EFA_SIM_DPKG_ROOT}" ]; then
		return 0
	fi
	if [[ $EUID -ne 0 ]]; then
		echo "This installer must be run as root."
		exit 1
	fi
}

prompt() {
	local question=$1
	local response

	printf "%s [y/n]: " "${question}"
	read -r response
	response="${response,,}"
	if [ "${response}" != 'y' ] && [ "${response}" != 'yes' ]; then
		echo "Exiting..."
		return 1
	fi
	return 0
}

# The package folder for this OS, OS_DIR (the lab's hosts are Debian 12, bookworm).
detect_os() {
	local os_release="${EFA_SIM_DPKG_ROOT}/etc/os-release"
	local id="" version_id=""
	if [ -f "${os_release}" ]; then
		id=$(sed -n 's/^ID=//p' "${os_release}" | tr -d '"')
		version_id=$(sed -n 's/^VERSION_ID=//p' "${os_release}" | tr -d '"')
	fi
	case "${id}-${version_id}" in
	debian-12)
		export OS_DIR="DEBIAN12"
		;;
	*)
		cat >&2 <<EOF
Unsupported operating system.
Refer EFA documentation (https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/efa.html#efa-amis) for more details on supported OSes.
EOF
		exit 1
		;;
	esac
	export DEBIAN_FRONTEND=noninteractive
}

detect_architecture() {
	arch=$(uname -m)
	if [ "$arch" != "x86_64" ]; then
		echo "Error: unknown architecture, exiting." >&2
		exit 1
	fi
}

# The installed version of a package, empty when it is not installed.
installed_version() {
	local name=$1
	local args=()
	if [ -n "${EFA_SIM_DPKG_ROOT}" ]; then
		args=("--admindir=${EFA_SIM_DPKG_ROOT}/var/lib/dpkg")
	fi
	dpkg-query "${args[@]}" -W -f='${db:Status-Status} ${Version}\n' "${name}" 2>/dev/null |
		awk '$1 == "installed" { print $2 }'
}

install_cmd() {
	if [ -n "${EFA_SIM_DPKG_ROOT}" ]; then
		local args
		mapfile -t args < <(dpkg_root_args)
		dpkg "${args[@]}" -i "$@"
	else
		apt-get install -y "$@"
	fi
}

# remove_cmd PURGE NAME...: purge (PURGE 1) or remove the packages.
remove_cmd() {
	local purge=$1
	shift
	if [ "$#" -eq 0 ]; then
		return 0
	fi
	if [ -n "${EFA_SIM_DPKG_ROOT}" ]; then
		local args
		mapfile -t args < <(dpkg_root_args)
		if [ "${purge}" -eq 1 ]; then
			dpkg "${args[@]}" --purge "$@"
		else
			dpkg "${args[@]}" --remove "$@"
		fi
	elif [ "${purge}" -eq 1 ]; then
		apt-get -y purge "$@"
	else
		apt-get -y remove "$@"
	fi
}
