"""A TCP client emulated over a TUN device, in a network namespace of its own (run as
`unshare -n python tests/tunclient.py`, root): it sends each of its handshake's packets
when told, so a listener can be left with a connection its client sees as made (the
SYN-ACK came) while the client's final ACK is still on its way.

It connects to a listener on 10.9.0.1:8080, lets stop_queueing (lrproxy.workers) act on
the listener between the SYN-ACK and the ACK, as when a stop begins one round trip after
a SYN, then sends the ACK and a request. It prints ACCEPTED (the listener accepted the
connection and read the request) or NOT ACCEPTED, then what the client gets when the
listener closes (RST: the client, who had connected and sent a POST, is reset)."""

from __future__ import annotations

import fcntl
import os
import select
import socket
import struct
import subprocess
import sys
import time

from lrproxy.workers import stop_queueing

CLIENT, SERVER, PORT = "10.9.0.2", "10.9.0.1", 8080
_TUNSETIFF = 0x400454CA
_IFF_TUN, _IFF_NO_PI = 0x0001, 0x1000
_SYN, _RST, _PSH, _ACK = 0x02, 0x04, 0x08, 0x10


def _sum(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _packet(seq: int, ack: int, flags: int, data: bytes = b"") -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 40000, PORT, seq, ack, 5 << 4, flags, 65535, 0, 0) + data
    pseudo = socket.inet_aton(CLIENT) + socket.inet_aton(SERVER) + struct.pack(
        "!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _sum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, socket.IPPROTO_TCP,
                     0, socket.inet_aton(CLIENT), socket.inet_aton(SERVER))
    return ip[:10] + struct.pack("!H", _sum(ip)) + ip[12:] + tcp


def _receive(tun: int, timeout: float) -> tuple[int, int] | None:
    """The next TCP segment to the client: its (sequence number, flags)."""
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        if not select.select([tun], [], [], left)[0]:
            break
        p = os.read(tun, 4096)
        if p[0] >> 4 == 4 and p[9] == socket.IPPROTO_TCP:
            seq, flags = struct.unpack_from("!I", p, 24)[0], p[33]
            return seq, flags
    return None


def main() -> None:
    tun = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(tun, _TUNSETIFF, struct.pack("16sH", b"t0", _IFF_TUN | _IFF_NO_PI))
    for cmd in ("ip link set lo up", f"ip addr add {SERVER}/24 dev t0", "ip link set t0 up"):
        subprocess.run(cmd.split(), check=True)
    listener = socket.create_server((SERVER, PORT), backlog=8)
    isn = 1000
    os.write(tun, _packet(isn, 0, _SYN))
    synack = _receive(tun, 3.0)
    assert synack is not None and synack[1] & (_SYN | _ACK) == _SYN | _ACK, synack
    # The client's connect() returns now; the stop begins before its ACK arrives.
    if "--no-stop-queueing" not in sys.argv:
        stop_queueing([listener])
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n"
    os.write(tun, _packet(isn + 1, synack[0] + 1, _ACK))
    os.write(tun, _packet(isn + 1, synack[0] + 1, _PSH | _ACK, request))
    listener.settimeout(1.5)
    try:
        conn, _ = listener.accept()
    except TimeoutError:
        print("NOT ACCEPTED")
    else:
        with conn:
            print("ACCEPTED" if conn.recv(100) == request else "ACCEPTED, NO REQUEST")
    listener.close()
    # the client, still waiting for its answer, sends again
    os.write(tun, _packet(isn + 1 + len(request), synack[0] + 1, _ACK))
    while (got := _receive(tun, 0.5)) is not None:
        if got[1] & _RST:
            print("RESET")


if __name__ == "__main__":
    main()
