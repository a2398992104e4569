# label-loop: the node labeller's long-lived parent, in the edgevirt image at
# /usr/local/lib/edgevirt/label-loop, run by the image's static busybox:
#   /bin/busybox sh /usr/local/lib/edgevirt/label-loop [--interval S] [--retry S] [--pass-timeout S] -- COMMAND...
#
# Runs one labelling pass (COMMAND, `edgevirt-node label --once ...`) as a child now, then every
# --interval seconds (600) after a pass that exited 0, --retry seconds (30) after one that failed. A
# pass that runs over --pass-timeout seconds (300: the probe boots a guest with timeouts of its own, an
# API server that hangs must not stop the loop for good) is killed and counts as failed.
# SIGTERM/SIGINT end the loop: at once between passes, after the pass under way otherwise (seconds; a
# pass is idempotent); exit 0 and "label-loop: stopped after N passes" on stderr. Usage errors: exit 2.
#
# Why shell: the pass needs the kubernetes client, grpc and the CRI stubs (~45 MiB resident) for
# seconds every 10 minutes; what stays between passes is this loop. A Python loop held ~11 MiB RSS /
# 6.7 MiB PSS on every node; busybox's sh holds well under 1 MiB (docs/install-node.md).
# LABEL_LOOP_BUSYBOX names the busybox binary (default /bin/busybox) for tests on other hosts.

bb=${LABEL_LOOP_BUSYBOX:-/bin/busybox}
interval=600
retry=30
pass_timeout=300

usage() {
    echo "label-loop: $1" >&2
    echo "usage: label-loop [--interval S] [--retry S] [--pass-timeout S] -- COMMAND..." >&2
    exit 2
}

# seconds OPTION VALUE: VALUE must be a positive whole or decimal number
seconds() {
    case $2 in
        '' | *[!0-9.]* | *.*.* | .) usage "$1 '$2': give a number of seconds, e.g. $1 600" ;;
    esac
    case $2 in
        *[1-9]*) ;;
        *) usage "$1 $2: must be above 0 seconds" ;;
    esac
}

while [ $# -gt 0 ]; do
    case $1 in
        --interval | --retry | --pass-timeout)
            [ $# -ge 2 ] || usage "$1 needs a number of seconds"
            seconds "$1" "$2"
            case $1 in
                --interval) interval=$2 ;;
                --retry) retry=$2 ;;
                *) pass_timeout=$2 ;;
            esac
            shift 2
            ;;
        --)
            shift
            break
            ;;
        *) usage "unknown option '$1'; give the pass's command after --" ;;
    esac
done
[ $# -gt 0 ] || usage "give the pass's command after --"
case $pass_timeout in
    *.*) usage "--pass-timeout $pass_timeout: whole seconds only (busybox timeout)" ;;
esac

stop=0
passes=0
sleeper=
# A trapped signal interrupts `wait` at once; during a pass (a foreground child) the shell runs the
# trap when the pass is over.
trap 'stop=1; [ -z "$sleeper" ] || kill "$sleeper" 2>/dev/null' TERM INT

while [ "$stop" = 0 ]; do
    # busybox timeout execs COMMAND in its own process and sends it SIGTERM after the time, SIGKILL
    # 10 s later if it is still there (a pass that ignores SIGTERM must not hang the loop)
    "$bb" timeout -k 10 "$pass_timeout" "$@"
    status=$?
    passes=$((passes + 1))
    pause=$interval
    if [ "$status" -ne 0 ]; then
        pause=$retry
        case $status in
            124 | 137 | 143) echo "label-loop: the pass ran over ${pass_timeout}s and was killed" >&2 ;;
            126 | 127) echo "label-loop: cannot run $1 (exit $status)" >&2 ;;
            *) echo "label-loop: the pass failed (exit $status); again in ${retry}s" >&2 ;;
        esac
    fi
    [ "$stop" = 0 ] || break
    "$bb" sleep "$pause" &
    sleeper=$!
    [ "$stop" = 0 ] || kill "$sleeper" 2>/dev/null # a signal just before $! was known
    wait "$sleeper"
    sleeper=
done
echo "label-loop: stopped after $passes passes" >&2
exit 0
