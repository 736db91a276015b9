#!/usr/bin/env bash
# Create or update the broker's password file: one user per edge node (username = node name)
# plus the service users kgpu-controller and kgpu-watch, each with a random password; and the
# first config of the dynamic-security plugin, holding its admin kgpu-broker-admin (the user the
# controller quarantines flooding nodes with), also with a random password.
#
#   make-users.sh [--dir DIR] [--broker URL] [--rotate] [--delete] NODE...
#
#   --dir DIR      where the files go (default ./kgpu-mqtt-users, env KGPU_USERS_DIR):
#                    DIR/passwd                     the mosquitto password file (hashes only)
#                    DIR/credentials/NAME.url       mqtt://NAME:PASSWORD@HOST:PORT   (mode 0600)
#                    DIR/credentials/NAME.password  the password alone, for KGPU_MQTT_PASSWORD_FILE
#                    DIR/dynamic-security.json      the plugin's first config: kgpu-broker-admin
#                                                   (hash only; its password is in credentials/)
#   --broker URL   the broker address written into the .url files (default
#                  mqtt://kgpu-mqtt.kgpu:1883, env KGPU_BROKER_URL; mqtts://HOST:8883 for TLS);
#                  given, it also rewrites the .url files of users that are kept; not given,
#                  a user's existing .url keeps its address (also on --rotate)
#   --rotate       give the named users new passwords (kgpu-controller, kgpu-watch and
#                  kgpu-broker-admin too, if named)
#   --delete       remove the named users and their credential files
#
# Idempotent: a user that already has a password keeps it, so re-running with a longer list of
# nodes only adds the new ones. Passwords never go to stdout; the credential files are 0600.
# After changing the password file, reload the broker (SIGHUP, or roll the pod): mosquitto 2.0
# re-reads password and ACL files on SIGHUP; connected clients stay connected.
#
# dynamic-security.json is only a seed: a broker copies it to its data volume on its first start
# and from then on the plugin keeps its own copy there (it writes every change to it). So
# `--rotate kgpu-broker-admin` rewrites the seed for new brokers; on a running broker set the
# new password with `mosquitto_ctrl -h HOST -u kgpu-broker-admin -P OLD dynsec
# setClientPassword kgpu-broker-admin NEW` (deploy/mosquitto/README.md). The seed is made by
# `mosquitto_ctrl dynsec init` (mosquitto's own format and hashing; same package as mosquitto_passwd).
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0" >&2; exit "${1:-2}"; }
die() { echo "make-users.sh: $*" >&2; exit 1; }

dir=${KGPU_USERS_DIR:-./kgpu-mqtt-users}
broker=${KGPU_BROKER_URL:-mqtt://kgpu-mqtt.kgpu:1883}
broker_given=${KGPU_BROKER_URL:+true}
rotate=false
delete=false
names=()
while (($#)); do
    case $1 in
        --dir) dir=${2:?--dir needs a value}; shift 2 ;;
        --dir=*) dir=${1#*=}; shift ;;
        --broker) broker=${2:?--broker needs a value}; broker_given=true; shift 2 ;;
        --broker=*) broker=${1#*=}; broker_given=true; shift ;;
        --rotate) rotate=true; shift ;;
        --delete) delete=true; shift ;;
        -h|--help) usage 0 ;;
        --) shift; names+=("$@"); break ;;
        -*) echo "make-users.sh: unknown option $1" >&2; usage ;;
        *) names+=("$1"); shift ;;
    esac
done
((${#names[@]})) || { echo "make-users.sh: name at least one node" >&2; usage; }
[[ $broker =~ ^mqtts?://[^/@]+$ ]] || die "--broker must look like mqtt://host:port or mqtts://host:port, got '$broker'"
command -v mosquitto_passwd >/dev/null || die "mosquitto_passwd not found (Debian package: mosquitto)"
$delete || command -v mosquitto_ctrl >/dev/null || die "mosquitto_ctrl not found (Debian package: mosquitto)"

service_users=(kgpu-controller kgpu-watch)
admin=kgpu-broker-admin  # the dynamic-security admin: in dynamic-security.json, never in passwd
is_service() { [[ $1 == kgpu-controller || $1 == kgpu-watch || $1 == "$admin" ]]; }
for name in "${names[@]}"; do
    # A Kubernetes node name (DNS subdomain), as shared/topics.py NODE_NAME_RE: this also keeps
    # MQTT wildcards, '/' and ':' (the password file's separator) out of usernames.
    [[ $name =~ ^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$ ]] || die "not a valid node name: '$name'"
done

umask 077
mkdir -p "$dir/credentials"
passwd="$dir/passwd"
dynsec="$dir/dynamic-security.json"
[[ -e $passwd ]] || : >"$passwd"

has_user() { awk -F: -v u="$1" '$1 == u {found = 1} END {exit !found}' "$passwd"; }
new_password() { od -An -tx1 -N24 /dev/urandom | tr -d ' \n'; }  # 192 bits, URL-safe

write_credentials() {  # NAME PASSWORD
    local address=$broker url_file="$dir/credentials/$1.url"
    if [[ -z $broker_given && -s $url_file ]]; then  # keep the address this user's URL already has
        address=$(sed -nE 's#^(mqtts?)://[^@/]*@([^/@]+)$#\1://\2#p' "$url_file")
        [[ -n $address ]] || address=$broker
    fi
    local scheme=${address%%://*} hostport=${address#*://}
    local tmp="$dir/credentials/.$1.tmp"
    printf '%s://%s:%s@%s\n' "$scheme" "$1" "$2" "$hostport" >"$tmp"
    mv -f "$tmp" "$dir/credentials/$1.url"
    printf '%s\n' "$2" >"$tmp"
    mv -f "$tmp" "$dir/credentials/$1.password"
}

if $delete; then
    for name in "${names[@]}"; do
        if has_user "$name"; then
            mosquitto_passwd -D "$passwd" "$name" >/dev/null
            echo "deleted $name"
        elif [[ $name == "$admin" && -e $dynsec ]]; then
            rm -f "$dynsec"
            echo "deleted $name ($dynsec)"
        fi
        rm -f "$dir/credentials/$name.url" "$dir/credentials/$name.password"
    done
    exit 0
fi

set_password() {  # NAME PASSWORD: through stdin, so the password never shows in `ps`
    printf '%s\n%s\n' "$2" "$2" | mosquitto_passwd "$passwd" "$1" >/dev/null 2>&1 \
        || die "mosquitto_passwd failed for $1"
}

ensure_user() {  # NAME FORCE_NEW
    local name=$1 force=$2 password verb
    if has_user "$name"; then
        if ! $force; then
            if [[ -s $dir/credentials/$name.password ]]; then
                if [[ -n $broker_given || ! -s $dir/credentials/$name.url ]]; then
                    password=$(<"$dir/credentials/$name.password")
                    write_credentials "$name" "$password"  # a new --broker: rewrite the URL
                fi
                echo "kept    $name"
            else
                echo "kept    $name (no credentials in $dir/credentials: --rotate to issue new ones)" >&2
            fi
            return
        fi
        verb=rotated
    else
        verb=created
    fi
    password=$(new_password)
    [[ ${#password} -eq 48 ]] || die "could not read /dev/urandom"
    set_password "$name" "$password"
    write_credentials "$name" "$password"
    echo "$verb $name"
}

write_seed() {  # PASSWORD: a new dynamic-security.json holding the admin alone
    local tmp="$dir/.dynamic-security.json.tmp"
    rm -f "$tmp"
    # The password through stdin (never in `ps`). mosquitto_ctrl 2.0 exits 0 even when it fails
    # (and refuses to overwrite a file): the new file is the proof.
    printf '%s\n%s\n' "$1" "$1" | mosquitto_ctrl dynsec init "$tmp" "$admin" >/dev/null 2>&1 || true
    [[ -s $tmp ]] || die "mosquitto_ctrl dynsec init failed to write $tmp"
    mv -f "$tmp" "$dynsec"
}

ensure_admin() {  # FORCE_NEW
    local force=$1 password verb=created creds="$dir/credentials/$admin.password"
    if ! $force && [[ -s $creds ]]; then
        password=$(<"$creds")
        if [[ -s $dynsec ]]; then
            echo "kept    $admin"
        else
            write_seed "$password"  # the seed was removed: the same password again
            echo "kept    $admin (wrote $dynsec)"
        fi
        [[ -z $broker_given && -s $dir/credentials/$admin.url ]] || write_credentials "$admin" "$password"
        return
    fi
    if ! $force && [[ -s $dynsec ]]; then
        echo "kept    $admin (no credentials in $dir/credentials: --rotate to issue new ones)" >&2
        return
    fi
    [[ -s $dynsec ]] && verb=rotated
    password=$(new_password)
    [[ ${#password} -eq 48 ]] || die "could not read /dev/urandom"
    write_seed "$password"
    write_credentials "$admin" "$password"
    echo "$verb $admin"
    [[ $verb == created ]] || echo "$dynsec is for new brokers; a running one keeps its own copy:" \
        "mosquitto_ctrl dynsec setClientPassword $admin (deploy/mosquitto/README.md)"
}

named() { local n; for n in "${names[@]}"; do [[ $n == "$1" ]] && return 0; done; return 1; }

# The service users always exist; they get a new password only when named with --rotate.
for name in "${service_users[@]}"; do
    if named "$name"; then ensure_user "$name" "$rotate"; else ensure_user "$name" false; fi
done
if named "$admin"; then ensure_admin "$rotate"; else ensure_admin false; fi
for name in "${names[@]}"; do
    is_service "$name" || ensure_user "$name" "$rotate"
done
chmod 600 "$passwd" "$dynsec"
echo "password file: $passwd; credentials: $dir/credentials/ (reload the broker to apply)"
