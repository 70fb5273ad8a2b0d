#!/usr/bin/env bash
# A whole lycoris-server session with printf and jq: two NDJSON requests in (one JSON
# object per line), two responses out. `initialize` tells who the server is and what it
# can do; `rpc.discover` returns its OpenRPC description, from which we list the methods.
# The server exits by itself when its stdin ends.
set -euo pipefail
command -v jq >/dev/null || { echo "error: jq is required but not installed (e.g. apt-get install jq)" >&2; exit 1; }

root=$(cd "${0%/*}/.." && pwd)
server=${LYCORIS_SERVER:-}
for build in release debug; do
    [[ -z $server && -x $root/.build/$build/lycoris-server ]] && server=$root/.build/$build/lycoris-server
done
[[ -n $server && -x $server ]] || { echo "error: no lycoris-server binary; build it (swift build) or set LYCORIS_SERVER" >&2; exit 1; }

printf '%s\n' \
    '{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocol_version":"1.0","client":"handshake.sh"}}' \
    '{"jsonrpc":"2.0","id":2,"method":"rpc.discover"}' |
LYCORIS_LOG_LEVEL=warning "$server" |
jq -r 'if .error then error("request \(.id) failed: \(.error.message)")
       elif .id == 1 then "server: \(.result.server.name) \(.result.server.version) (protocol \(.result.protocol_version))",
                          "capabilities:", (.result.capabilities | to_entries[] | "  \(.key): \(.value | tojson)")
       elif (.result.methods // []) != [] then "methods (\(.result.methods | length)):", "  \([.result.methods[].name] | join(" "))"
       else "rpc.discover (no methods listed yet): \(.result | tojson)" end'
