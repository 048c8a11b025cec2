#!/bin/bash
# Fleet lab simulation of efa_installer.sh, the installation script of AWS's EFA installer tarball
# (aws-efa-installer-<version>.tar.gz, extracted to aws-efa-installer/, run there as `./efa_installer.sh -y`).
#
# What it keeps from AWS's script: the options the fleet uses or may pass (-y, -u, -n, -k, -m, -g), the
# packages it installs from its own DEBS/<OS>/x86_64 folder (then rdma-core/ and efa-driver/), a package
# already installed at the same or a newer version is skipped (it never downgrades), and its record:
# /opt/amazon/efa_installed_packages, three comment lines (installer version, debug packages, "Packages
# installed:") and the installed packages' file names without .deb on one line, space-separated; `-u`
# removes the packages that record names. What it leaves out (the lab's hosts are containers): the
# third-party dependencies (dkms, linux-headers, environment-modules), kernel detection, modprobe and
# update-initramfs; the efa package carries no DKMS build.

if [ ! -e common.sh ] || [ ! -e env.sh ]; then
	echo "Please cd into the installer directory." >&2
	exit 1
fi

# shellcheck source=/dev/null
. ./env.sh
if [ "${EFA_INSTALLER_VERSION:-}" = "" ]; then
	echo "Installer version is not defined in env.sh" >&2
	exit 1
fi

# shellcheck source=common.sh
. ./common.sh

DIR=$(dirname "$0")
LIBFABRIC_INSTALL_PATH="/opt/amazon/efa"
INSTALLED_PKGS_FILE="${EFA_SIM_DPKG_ROOT}/opt/amazon/efa_installed_packages"
PREV_INSTALLED_PKGS_FILE="${EFA_SIM_DPKG_ROOT}/opt/amazon/efa/installed_packages"
declare -a INSTALLED_PKGS=()

UNINSTALL=0
UNATTENDED=0
NO_VERIFY=0
SKIP_KMOD=0
MINIMAL=0

usage() {
	cat <<EOF
usage: $(basename "$0") [options]

Options:
 -u, --uninstall	Uninstall EFA packages
 -y, --yes		Run installer without prompting for confirmation
 -n, --no-verify	Skip EFA device verification and test
 -k, --skip-kmod	Skip EFA kmod installation
 -g, --enable-gdr       Enable GPUDirect RDMA support. This option is not needed as the support is enabled by default.
 -m, --minimal          Only install kernel module and rdma-core, do not install libfabric
EOF
}

setup_install_package_paths() {
	local base_dir="DEBS/${OS_DIR}/${arch}"
	if [ ! -d "${base_dir}" ]; then
		echo "Error: package directory ${base_dir} does not exist." >&2
		exit 1
	fi
	PACKAGE_PATHS=()
	local path
	for path in "${base_dir}"/*.deb "${base_dir}"/rdma-core/*.deb; do
		[ -f "${path}" ] && PACKAGE_PATHS+=("${path}")
	done
	if [ ${SKIP_KMOD} -eq 0 ]; then
		for path in "${base_dir}"/efa-driver/*.deb; do
			[ -f "${path}" ] && PACKAGE_PATHS+=("${path}")
		done
	fi
	for path in "${PACKAGE_PATHS[@]}"; do
		if ! grep -Fxq "${path}" package_list.txt; then
			echo "Error: unknown package found: ${path}"
			echo "Please remove unknown packages from the RPMS/DEBS directory trees"
			exit 1
		fi
	done
}

read_package_file() {
	local line words
	while read -r line; do
		read -r -a words <<<"${line}"
		INSTALLED_PKGS+=("${words[@]}")
	done < <(grep -v '^#' "${INSTALLED_PKGS_FILE}")
}

write_package_file() {
	mkdir -p "$(dirname "${INSTALLED_PKGS_FILE}")"
	rm -rf "${PREV_INSTALLED_PKGS_FILE}"
	cat <<EOF >"${INSTALLED_PKGS_FILE}"
# EFA installer version: ${EFA_INSTALLER_VERSION}
# Debug packages installed: no
# Packages installed:
${INSTALLED_PKGS[*]}
EOF
}

efa_installed() {
	[ -f "${INSTALLED_PKGS_FILE}" ]
}

# A package file to skip: the same or a newer version of its package is installed (never downgrade).
package_should_be_skipped() {
	local pkg pkg_name pkg_ver installed_pkg_ver
	pkg=$(basename "$1" .deb)
	pkg_name=$(echo "${pkg}" | cut -d '_' -f 1)
	pkg_ver=$(echo "${pkg}" | cut -d '_' -f 2)
	installed_pkg_ver=$(installed_version "${pkg_name}")
	if [ -n "${installed_pkg_ver}" ] && dpkg --compare-versions "${pkg_ver}" le "${installed_pkg_ver}"; then
		echo "${pkg_name}_${installed_pkg_ver} already installed"
		return 0
	fi
	return 1
}

install_efa_packages() {
	local pkgs=()
	local rdmacore_pkgs=()
	local package_path package_name
	for package_path in "${PACKAGE_PATHS[@]}"; do
		package_name=$(basename "${package_path}" .deb)
		if [ ${MINIMAL} -eq 1 ]; then
			if [[ ${package_name} = *"libfabric"* || ${package_name} = *"efa-profile"* ]]; then
				echo "skipping ${package_name} because of minimal installation"
				continue
			fi
		fi
		INSTALLED_PKGS+=("${package_name}")
		if package_should_be_skipped "${package_path}"; then
			continue
		fi
		if [[ ${package_path} = *"rdma-core"* ]]; then
			rdmacore_pkgs+=("${DIR}/${package_path}")
		else
			pkgs+=("${DIR}/${package_path}")
		fi
	done

	if [ "${#rdmacore_pkgs[@]}" -ne 0 ]; then
		echo "Installing ${rdmacore_pkgs[*]}"
		if ! install_cmd "${rdmacore_pkgs[@]}"; then
			echo "Error: Failed to install packages." >&2
			return 1
		fi
	fi
	if [ "${#pkgs[@]}" -ne 0 ]; then
		echo "Installing ${pkgs[*]}"
		if ! install_cmd "${pkgs[@]}"; then
			echo "Error: Failed to install packages." >&2
			return 1
		fi
	fi
	if ! write_package_file; then
		echo "Error: failed to write installed packages file." >&2
		return 1
	fi
	return 0
}

uninstall_efa() {
	if ! efa_installed; then
		echo "Error: EFA is not installed, exiting." >&2
		exit 1
	fi
	read_package_file
	echo "== Uninstalling EFA packages =="
	local names=() purge=() pkg name
	for pkg in "${INSTALLED_PKGS[@]}"; do
		name=$(echo "${pkg}" | cut -d '_' -f 1)
		[ -n "$(installed_version "${name}")" ] || continue
		if [[ ${name} = *"efa-config"* || ${name} = *"efa-profile"* ]]; then
			purge+=("${name}")
		else
			names+=("${name}")
		fi
	done
	if ! remove_cmd 1 "${purge[@]}" || ! remove_cmd 0 "${names[@]}"; then
		echo "Error: failed to uninstall EFA packages, please remove them manually." >&2
		echo "EFA uninstall encountered errors, please check output." >&2
		return 1
	fi
	rm -f "${INSTALLED_PKGS_FILE}"
	echo ""
	echo "EFA uninstall complete."
	return 0
}

test_efa() {
	if [ ${NO_VERIFY} -eq 1 ]; then
		return 0
	fi
	if [ ${MINIMAL} -eq 1 ]; then
		echo "Minimal installation does not include libfabric, skipping test."
		return 0
	fi
	if ! "${EFA_SIM_DPKG_ROOT}${LIBFABRIC_INSTALL_PATH}/bin/fi_info" -p efa >/dev/null 2>&1; then
		echo "EFA device not detected, skipping test."
		return 0
	fi
	echo "== Testing EFA device =="
	"${EFA_SIM_DPKG_ROOT}${LIBFABRIC_INSTALL_PATH}/bin/fi_info" -p efa -t FI_EP_RDM
}

echo "= Starting Amazon Elastic Fabric Adapter Installation Script ="
echo "= EFA Installer Version: ${EFA_INSTALLER_VERSION} ="
echo ""

detect_architecture

if ! TEMP=$(getopt -o :unykmg --long uninstall,no-verify,yes,skip-kmod,minimal,enable-gdr -- "$@"); then
	usage
	exit 1
fi
eval set -- "$TEMP"
unset TEMP

while true; do
	case "$1" in
	'-u' | '--uninstall')
		UNINSTALL=1
		shift
		;;
	'-y' | '--yes')
		UNATTENDED=1
		shift
		;;
	'-n' | '--no-verify')
		NO_VERIFY=1
		shift
		;;
	'-k' | '--skip-kmod')
		SKIP_KMOD=1
		shift
		;;
	'-m' | '--minimal')
		MINIMAL=1
		shift
		;;
	'-g' | '--enable-gdr')
		shift
		;;
	'--')
		shift
		break
		;;
	*)
		usage
		exit 1
		;;
	esac
done

is_root
detect_os

if [ ${UNINSTALL} -eq 1 ]; then
	if [ ${UNATTENDED} -ne 1 ]; then
		prompt "Please confirm that you would like to uninstall EFA" || exit 1
	fi
	uninstall_efa
	exit $?
fi

if efa_installed; then
	if [ ${UNATTENDED} -ne 1 ]; then
		prompt "EFA is already installed. Would you like to reinstall EFA?" || exit 1
	fi
elif [ ${UNATTENDED} -ne 1 ]; then
	prompt "This script will install the EFA kernel driver and required user space packages. Do you wish to continue?" || exit 1
fi

setup_install_package_paths
echo "== Installing EFA packages =="
if ! install_efa_packages; then
	echo "Error: failed to install EFA packages, exiting" >&2
	exit 1
fi

test_efa

cat <<EOF
===================================================
EFA installation complete.
- Please logout/login to complete the installation.
- Libfabric was installed in ${LIBFABRIC_INSTALL_PATH}
===================================================
EOF
