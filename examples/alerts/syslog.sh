#!/bin/sh
# A xenpool alert: one syslog line per event (facility daemon; fences at priority crit).
# Configure with --alert=/path/to/syslog.sh on the registrar, the PEs and the keeper.
# The event arrives as JSON on stdin and as XENPOOL_* variables (XENPOOL_KIND, XENPOOL_HOST, ...).
case "$XENPOOL_KIND" in
    fence_failure) priority=daemon.crit ;;
    fence_*|host_lost|failover|vm_lost) priority=daemon.warning ;;
    *) priority=daemon.info ;;
esac
exec logger -t xenpool -p "$priority" -- "$XENPOOL_KIND: $(cat)"
