#!/usr/bin/env bash
# Create or update the broker's password file: one user per edge node (username = node name)
# plus the service users kgpu-controller and kgpu-watch, each with a random password.
#
#   make-users.sh [--dir DIR] [--broker URL] [--rotate] [--delete] NODE...
#
#   --dir DIR      where the files go (default ./kgpu-mqtt-users, env KGPU_USERS_DIR):
#                    DIR/passwd                     the mosquitto password file (hashes only)
#                    DIR/credentials/NAME.url       mqtt://NAME:PASSWORD@HOST:PORT   (mode 0600)
#                    DIR/credentials/NAME.password  the password alone, for KGPU_MQTT_PASSWORD_FILE
#   --broker URL   the broker address written into the .url files (default
#                  mqtt://kgpu-mqtt.kgpu:1883, env KGPU_BROKER_URL; mqtts://HOST:8883 for TLS);
#                  given, it also rewrites the .url files of users that are kept; not given,
#                  a user's existing .url keeps its address (also on --rotate)
#   --rotate       give the named users new passwords (kgpu-controller and kgpu-watch too, if named)
#   --delete       remove the named users and their credential files
#
# Idempotent: a user that already has a password keeps it, so re-running with a longer list of
# nodes only adds the new ones. Passwords never go to stdout; the credential files are 0600.
# After changing the password file, reload the broker (SIGHUP, or roll the pod): mosquitto 2.0
# re-reads password and ACL files on SIGHUP; connected clients stay connected.
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

service_users=(kgpu-controller kgpu-watch)
is_service() { [[ $1 == kgpu-controller || $1 == kgpu-watch ]]; }
for name in "${names[@]}"; do
    # A Kubernetes node name (DNS subdomain), as shared/topics.py NODE_NAME_RE: this also keeps
    # MQTT wildcards, '/' and ':' (the password file's separator) out of usernames.
    [[ $name =~ ^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$ ]] || die "not a valid node name: '$name'"
done

umask 077
mkdir -p "$dir/credentials"
passwd="$dir/passwd"
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

named() { local n; for n in "${names[@]}"; do [[ $n == "$1" ]] && return 0; done; return 1; }

# The service users always exist; they get a new password only when named with --rotate.
for name in "${service_users[@]}"; do
    if named "$name"; then ensure_user "$name" "$rotate"; else ensure_user "$name" false; fi
done
for name in "${names[@]}"; do
    is_service "$name" || ensure_user "$name" "$rotate"
done
chmod 600 "$passwd"
echo "password file: $passwd; credentials: $dir/credentials/ (reload the broker to apply)"
