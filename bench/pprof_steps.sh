#!/usr/bin/env bash
# Splits a CPU profile of the server (bench/out/cpu-*.pprof, taken by `make bench`
# during a phase) into the steps of a send, in CPU microseconds per message:
# the cumulative time of the function that does each step, divided by the messages
# sent while the profile ran (msg/s of the phase × the profile's length). Steps
# nest (the handler holds the parse of its body), so the column does not add up;
# "all" is the whole process.
#
#   bench/pprof_steps.sh BINARY PROFILE MSG_PER_SECOND
set -euo pipefail
bin=$1 prof=$2 rate=$3
go tool pprof -top -cum -nodecount=100000 "$bin" "$prof" 2>/dev/null | awk -v rate="$rate" '
  function secs(v) {
    if (v ~ /ms$/) return substr(v, 1, length(v) - 2) / 1000
    if (v ~ /us$/) return substr(v, 1, length(v) - 2) / 1e6
    if (v ~ /s$/) return substr(v, 1, length(v) - 1) + 0
    return v + 0
  }
  BEGIN {
    # step | a regular expression for the function that does it (its largest
    # cumulative time counts, so closures nested in one another count once)
    n = split("net/http: read and parse the request|^net/http\\.\\(\\*conn\\)\\.readRequest$|" \
      "net/http: finish and flush the response|^net/http\\.\\(\\*response\\)\\.finishRequest$|" \
      "middleware: recover, security headers, CORS, instrument, timeout (holds all below)|^main\\.\\(\\*server\\)\\.routes\\.\\(\\*server\\)\\.recoverPanics\\.func[0-9]+$|" \
      "auth: check the token and session|^main\\.\\(\\*server\\)\\.checkToken$|" \
      "rate limit|^main\\.\\(\\*limiter\\[.*\\]\\)\\.allow$|" \
      "the send handler, in all (holds all below to the 201)|handleCreateMessage\\.func[0-9]+$|" \
      "JSON: decode the request body|^main\\.decodeJSON$|" \
      "content: normalise|^main\\.normalizeContent$|" \
      "queue to a send worker and wait for it|^main\\.\\(\\*sendBatcher\\)\\.send$|" \
      "JSON: encode the 201|^main\\.respond$|" \
      "request metrics|^main\\.\\(\\*metrics\\)\\.observeRequest$|" \
      "request log line|^log/slog\\.\\(\\*Logger\\)\\.log$|" \
      "send worker: send_messages round trip, client side (lib/pq)|^main\\.\\(\\*sendBatcher\\)\\.store$|" \
      "local delivery, and NOTIFY queued if another instance listens (notifier.enqueue)|^main\\.\\(\\*notifier\\)\\.enqueue$|" \
      "NOTIFY: the round trip|^main\\.\\(\\*notifier\\)\\.flush$|" \
      "LISTEN: read notifications back (lib/pq)|^github\\.com/lib/pq\\.\\(\\*ListenerConn\\)\\.listenerConnLoop$|" \
      "hub: decode the payload and fan out|^main\\.\\(\\*Hub\\)\\.dispatch$|" \
      "streams: write and flush frames (streamConn.step, parked streams or not)|^main\\.\\(\\*streamConn\\)\\.step$|" \
      "garbage collection (background marking)|^runtime\\.gcBgMarkWorker$|" \
      "scheduler (finding work, netpoll)|^runtime\\.findRunnable$|" \
      "system calls, all (read, write, futex, epoll)|^internal/runtime/syscall/linux\\.Syscall6$", a, "|")
    steps = n / 2
    for (i = 1; i <= steps; i++) { label[i] = a[2 * i - 1]; re[i] = a[2 * i] }
  }
  /^Duration: / { d = $2; sub(/s,?$/, "", d); total = $6; next }
  NF >= 6 && $5 ~ /%$/ {
    fn = $6; for (i = 7; i <= NF; i++) fn = fn " " $i
    sub(/ \(inline\)$/, "", fn)
    for (i = 1; i <= steps; i++) if (fn ~ re[i] && secs($4) > cum[i]) cum[i] = secs($4)
  }
  END {
    msgs = rate * d
    printf "profile of %s s, %s of CPU in it, %.0f messages sent meanwhile (%.0f msg/s).\n\n", d, total, msgs, rate
    printf "| step | CPU s in the profile | µs per message |\n| --- | --- | --- |\n"
    printf "| the whole server process | %.2f | %.0f |\n", secs(total), secs(total) / msgs * 1e6
    for (i = 1; i <= steps; i++) printf "| %s | %.2f | %.0f |\n", label[i], cum[i], cum[i] / msgs * 1e6
  }'
