#!/usr/bin/python3
"""Freezes or thaws a guest's file systems through qemu-guest-agent.

Usage: qga.py SOCKET freeze|thaw

SOCKET is the host side of the guest agent's virtio-serial channel (QEMU's
`-chardev socket,path=SOCKET,server=on,wait=off`). The script synchronises with
the agent (guest-sync-delimited, so a reply left over from an earlier client is
skipped), then sends guest-fsfreeze-freeze or guest-fsfreeze-thaw and prints the
number of file systems it froze or thawed. Any error, or no answer within 20 s,
exits non-zero with the reason on stderr: blkrep's freeze and thaw commands
(`[group.app_consistent]`) fail the point then. With libvirt, `virsh domfsfreeze`
and `virsh domfsthaw` do the same through libvirt's own agent channel.
"""

import json
import random
import socket
import sys

TIMEOUT = 20.0


def exchange(sock, command, arguments=None):
    request = {"execute": command}
    if arguments is not None:
        request["arguments"] = arguments
    sock.sendall(json.dumps(request).encode() + b"\n")


def read_reply(stream):
    """The next JSON object the agent sends, skipping the 0xff sync marker."""
    while True:
        line = stream.readline()
        if not line:
            raise RuntimeError("the guest agent closed the channel")
        line = line.lstrip(b"\xff").strip()
        if line:
            return json.loads(line)


def main():
    if len(sys.argv) != 3 or sys.argv[2] not in ("freeze", "thaw"):
        sys.exit("usage: qga.py SOCKET freeze|thaw")
    path, action = sys.argv[1], sys.argv[2]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    sock.connect(path)
    stream = sock.makefile("rb")
    token = random.randrange(1, 2**31)
    exchange(sock, "guest-sync-delimited", {"id": token})
    while read_reply(stream).get("return") != token:
        pass
    command = "guest-fsfreeze-freeze" if action == "freeze" else "guest-fsfreeze-thaw"
    exchange(sock, command)
    reply = read_reply(stream)
    if "error" in reply:
        sys.exit(f"{command}: {reply['error'].get('desc', reply['error'])}")
    print(f"{action}: {reply.get('return')} file system(s)")


if __name__ == "__main__":
    try:
        main()
    except (OSError, RuntimeError, ValueError) as error:
        sys.exit(f"guest agent: {error}")
