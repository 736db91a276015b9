#!/usr/bin/env bash
# A CA and a server certificate for the broker's TLS listener (8883), plus optional client
# certificates for mutual TLS. Uses openssl only.
#
#   make-certs.sh [--dir DIR] [--days N] [--ca-days N] [--new-ca] [--client NAME]... HOST...
#
#   HOST...        the names edge nodes use to reach the broker; each becomes a subjectAltName
#                  (an IPv4/IPv6 address becomes IP:..., anything else DNS:...). The first is
#                  also the certificate's CN. E.g.: mqtt.example.com kgpu-mqtt.kgpu.svc 203.0.113.7
#   --dir DIR      output directory (default ./kgpu-mqtt-certs, env KGPU_CERTS_DIR):
#                    ca.crt ca.key            the CA (kept and reused unless --new-ca)
#                    server.crt server.key    for mosquitto's certfile/keyfile
#                    client-NAME.crt/.key     with --client NAME (CN = NAME, for
#                                             require_certificate/use_identity_as_username)
#   --days N       validity of server and client certificates (default 397)
#   --ca-days N    validity of a new CA (default 3650)
#   --new-ca       make a new CA even if DIR/ca.key exists; the old CA certificate is kept as
#                  ca-previous.crt and ca-bundle.crt holds both, for clients to trust during the
#                  changeover (docs/broker.md, "Certificate rotation")
#
# Re-running with an existing CA issues a fresh server certificate signed by the same CA, so
# clients that trust ca.crt need no change: that is how the server certificate is rotated.
# mosquitto 2.0 reloads certfile/keyfile on SIGHUP. Keys are ECDSA P-256; *.key files are 0600.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0" >&2; exit "${1:-2}"; }
die() { echo "make-certs.sh: $*" >&2; exit 1; }

dir=${KGPU_CERTS_DIR:-./kgpu-mqtt-certs}
days=397
ca_days=3650
new_ca=false
clients=()
hosts=()
while (($#)); do
    case $1 in
        --dir) dir=${2:?--dir needs a value}; shift 2 ;;
        --days) days=${2:?--days needs a value}; shift 2 ;;
        --ca-days) ca_days=${2:?--ca-days needs a value}; shift 2 ;;
        --new-ca) new_ca=true; shift ;;
        --client) clients+=("${2:?--client needs a name}"); shift 2 ;;
        -h|--help) usage 0 ;;
        -*) echo "make-certs.sh: unknown option $1" >&2; usage ;;
        *) hosts+=("$1"); shift ;;
    esac
done
((${#hosts[@]})) || { echo "make-certs.sh: name at least one HOST" >&2; usage; }
[[ $days =~ ^[0-9]+$ && $ca_days =~ ^[0-9]+$ ]] || die "--days and --ca-days take a number of days"
command -v openssl >/dev/null || die "openssl not found"

sans=()
for host in "${hosts[@]}"; do
    if [[ $host =~ ^[0-9]+(\.[0-9]+){3}$ || $host == *:* ]]; then
        sans+=("IP:$host")
    elif [[ $host =~ ^[A-Za-z0-9*]([-A-Za-z0-9.]*[A-Za-z0-9])?$ ]]; then
        sans+=("DNS:$host")
    else
        die "not a host name or IP address: '$host'"
    fi
done
for name in "${clients[@]}"; do
    [[ $name =~ ^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$ ]] || die "not a valid client (node) name: '$name'"
done
san_list=$(IFS=,; echo "${sans[*]}")

umask 077
mkdir -p "$dir"
work=$(mktemp -d "$dir/.work.XXXXXX")
trap 'rm -rf "$work"' EXIT

ssl() { openssl "$@" 2>"$work/openssl.err" || { cat "$work/openssl.err" >&2; die "openssl $1 failed"; }; }
new_key() { ssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"; }

if $new_ca || [[ ! -s $dir/ca.key || ! -s $dir/ca.crt ]]; then
    cat >"$work/ca.cnf" <<EOF
[req]
distinguished_name = dn
prompt = no
x509_extensions = v3_ca
[dn]
CN = kgpu MQTT CA
[v3_ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF
    new_key "$work/ca.key"
    ssl req -new -x509 -config "$work/ca.cnf" -key "$work/ca.key" -days "$ca_days" -sha256 -out "$work/ca.crt"
    if [[ -s $dir/ca.crt ]]; then
        # CA rotation: keep the old CA certificate, and a bundle of both for the changeover
        mv -f "$dir/ca.crt" "$dir/ca-previous.crt"
        rm -f "$dir/ca.key"
        cat "$work/ca.crt" "$dir/ca-previous.crt" >"$dir/ca-bundle.crt"
        chmod 644 "$dir/ca-previous.crt" "$dir/ca-bundle.crt"
        echo "replaced the CA: the old one is in $dir/ca-previous.crt, both in $dir/ca-bundle.crt"
    fi
    mv -f "$work/ca.key" "$dir/ca.key"
    mv -f "$work/ca.crt" "$dir/ca.crt"
    echo "created CA $dir/ca.crt"
else
    echo "reusing CA $dir/ca.crt"
fi

issue() {  # NAME CN EXTENSIONS
    local name=$1 cn=$2
    printf '[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = %s\n' "$cn" >"$work/$name.cnf"
    printf '%s\n' "basicConstraints = critical, CA:FALSE" "subjectKeyIdentifier = hash" \
        "authorityKeyIdentifier = keyid, issuer" "$3" >"$work/$name.ext"
    new_key "$work/$name.key"
    ssl req -new -config "$work/$name.cnf" -key "$work/$name.key" -out "$work/$name.csr"
    ssl x509 -req -in "$work/$name.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -set_serial "0x$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')" \
        -days "$days" -sha256 -extfile "$work/$name.ext" -out "$work/$name.crt"
    mv -f "$work/$name.key" "$dir/$name.key"
    mv -f "$work/$name.crt" "$dir/$name.crt"
    chmod 644 "$dir/$name.crt"
    echo "issued $dir/$name.crt (CN=$cn)"
}

issue server "${hosts[0]}" "keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = $san_list"
for name in "${clients[@]}"; do
    issue "client-$name" "$name" "keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth"
done
chmod 644 "$dir/ca.crt"
echo "server certificate for: $san_list"
