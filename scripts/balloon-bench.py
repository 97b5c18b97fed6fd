#!/usr/bin/env python3
"""Balloon reclaim rate, Worldvisor against QEMU (issue 13's measure), interleaved rounds.

Each round boots the probe guest with 1300 MiB and a balloon (`probe.tests=balloon
probe.balloon_mib=1100`: it touches 1100 MiB first), asks the balloon for 1 GiB and times
until the VMM has released it (wv: `ballooned_bytes` on `GET /vm/balloon`; QEMU: QMP
`query-balloon` reaching the target), then reads how far the VMM's RSS fell.

    cargo build --release -p wv && python3 scripts/balloon-bench.py [ROUNDS]

Needs /dev/kvm and qemu-system-x86_64 (skipped, and said so, when it is missing).
"""
import json, os, shutil, socket, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WV = os.path.join(ROOT, "target/x86_64-unknown-linux-gnu/release/wv")
CMDLINE = "console=ttyS0 probe.tests=balloon probe.balloon_mib=1100"
GIB = 1 << 30


def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
    return 0


def wait_touched(p):
    for line in p.stdout:
        if "balloon: touched" in line:
            return
        if line.startswith("FAIL"):
            raise SystemExit(line)
    raise SystemExit("the guest ended before touching its pool")


def http(sock, method, path, body=None):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    b = json.dumps(body) if body is not None else ""
    s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(b)}\r\n"
              f"Connection: close\r\n\r\n{b}".encode())
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), (json.loads(rest) if rest.strip() else None)


def wv_round(d):
    sock = os.path.join(d, "wv.sock")
    p = subprocess.Popen([WV, "run", "--memory", "1300M", "--balloon", "on", "--api-socket", sock,
                          "--cmdline", CMDLINE], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        wait_touched(p)
        r0, t = rss(p.pid), time.monotonic()
        http(sock, "PUT", "/vm/balloon", {"target_bytes": GIB})
        while http(sock, "GET", "/vm/balloon")[1].get("ballooned_bytes", 0) < GIB:
            time.sleep(0.002)
        return time.monotonic() - t, r0 - rss(p.pid)
    finally:
        p.kill()
        p.wait()


def qemu_round(d, image):
    qmp = os.path.join(d, "qmp.sock")
    p = subprocess.Popen(["qemu-system-x86_64", "-accel", "kvm", "-M", "pc", "-m", "1300M",
                          "-smp", "1", "-display", "none", "-no-reboot", "-nodefaults",
                          "-serial", "stdio", "-monitor", "none",
                          "-qmp", f"unix:{qmp},server,nowait",
                          "-device", "virtio-balloon-pci,disable-legacy=on",
                          "-kernel", image, "-append", CMDLINE],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_touched(p)
        s = socket.socket(socket.AF_UNIX)
        s.connect(qmp)
        f = s.makefile("rw")
        f.readline()

        def cmd(c, **a):
            f.write(json.dumps({"execute": c, "arguments": a}) + "\n")
            f.flush()
            while True:
                r = json.loads(f.readline())
                if "return" in r or "error" in r:
                    return r
        cmd("qmp_capabilities")
        target = 1300 * (1 << 20) - GIB
        r0, t = rss(p.pid), time.monotonic()
        cmd("balloon", value=target)
        while cmd("query-balloon")["return"]["actual"] > target:
            time.sleep(0.002)
        took = time.monotonic() - t
        return took, r0 - rss(p.pid)
    finally:
        p.kill()
        p.wait()


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    qemu = shutil.which("qemu-system-x86_64")
    with tempfile.TemporaryDirectory() as d:
        image = os.path.join(d, "probe.pvh")
        subprocess.run([WV, "probe-image", "--format", "pvh", "--output", image], check=True)
        rows = {"wv": [], "QEMU": []}
        for r in range(rounds):
            rows["wv"].append(wv_round(d))
            if qemu:
                rows["QEMU"].append(qemu_round(d, image))
        if not qemu:
            print("QEMU: qemu-system-x86_64 is not installed: not measured")
        for name, v in rows.items():
            if not v:
                continue
            times = sorted(t for t, _ in v)
            fell = sorted(f for _, f in v)
            med = times[len(times) // 2]
            print(f"{name:5} inflate 1 GiB: median {med * 1000:.0f} ms ({1024 / med:.0f} MiB/s), "
                  f"range {times[0] * 1000:.0f}-{times[-1] * 1000:.0f} ms; RSS fell "
                  f"{fell[len(fell) // 2] / (1 << 20):.0f} MiB (median), {len(v)} rounds")


if __name__ == "__main__":
    main()
