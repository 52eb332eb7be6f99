#!/usr/bin/env bash
# Installs a local Slurm (Debian's slurmctld, slurmd, slurm-client) and munge for the Slurm integration tests.
#
#     .ci/install_slurm.sh          (as root, or with passwordless sudo; called by .ci/run)
#
# Non-interactive and idempotent: does nothing when every binary is already there. The packages' services are not
# started here (policy-rc.d forbids it during the install): tests/slurm_cluster.py writes its own slurm.conf into a
# temporary directory and starts munged, slurmctld and slurmd itself.
set -euo pipefail

need=(slurmctld slurmd sbatch srun scontrol scancel sinfo squeue munged)
missing=0
for binary in "${need[@]}"; do
    command -v "$binary" >/dev/null 2>&1 || [ -x "/usr/sbin/$binary" ] || missing=1
done
if [ "$missing" = 0 ]; then
    echo "install_slurm: slurmctld, slurmd, slurm-client and munge are already installed"
    exit 0
fi

SUDO=""
if [ "$(id -u)" != 0 ]; then
    SUDO="sudo -n"
fi

# Keep the packages' postinst scripts from starting daemons (no init system in CI containers, and the tests run their
# own). Only a policy file this script created is removed again.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
    created_policy=1
fi
cleanup() {
    if [ "$created_policy" = 1 ]; then
        $SUDO rm -f "$policy"
    fi
}
trap cleanup EXIT

# `env` so the variable survives sudo, which resets the environment.
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    slurmctld slurmd slurm-client munge >/dev/null

for binary in "${need[@]}"; do
    if ! command -v "$binary" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$binary" ]; then
        echo "install_slurm: $binary is still missing after the install" >&2
        exit 1
    fi
done
echo "install_slurm: installed $(dpkg-query -W -f 'slurmctld ${Version}, munge ' slurmctld)$(dpkg-query -W -f '${Version}' munge)"
