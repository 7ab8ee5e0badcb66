"""Runs inside the sandbox's fresh namespaces (as root there), prepares the jail and execs
the candidate. Standard library only: it is started as ``python -I -S <this file> spec``.

Steps: read the candidate's files from the staging folder; make every mount private;
put fresh size-limited tmpfs over the world-writable folders (/tmp, /var/tmp, /dev/shm,
/run/lock) so nothing written there outlives the run; hide unreadable folders that hold
the interpreter (e.g. /root) behind a tmpfs with only the interpreter bound back,
read-only; write the files into /tmp/work; set the resource limits; drop to an
unprivileged uid; exec Python on the candidate. Any setup failure exits 125 with
``SETUP_FAILED`` on stderr, before candidate code ever runs.
"""

import ctypes
import json
import os
import resource
import sys

SETUP_FAILED = "IDLM-SANDBOX-SETUP-FAILED"
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT = 1, 2, 4, 32
MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 4096, 8192, 16384, 1 << 18
WRITABLE_FOLDERS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
WORK_DIR = "/tmp/work"


def mount(source, target, fstype, flags, data=None):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                           ctypes.c_ulong, ctypes.c_char_p)
    def encode(value):
        return value.encode() if value is not None else None

    if libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"mount {target}: {os.strerror(error)}")


def tmpfs(target, size_mb, mode):
    mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size_mb}m,mode={mode}")


def build_jail(spec):
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    # Hold what must stay reachable (the interpreter, maybe a venv under /tmp) by O_PATH
    # descriptors before tmpfs covers its folder, then bind it back read-only from them.
    keep = [(hidden, path, os.open(path, os.O_PATH)) for hidden, path in spec["hidden"]]
    for folder in WRITABLE_FOLDERS:
        if os.path.isdir(folder):
            tmpfs(folder, spec["tmpfs_mb"], "1777")
    covered = set(WRITABLE_FOLDERS)
    for hidden, path, descriptor in keep:
        if hidden not in covered:
            tmpfs(hidden, 1, "755")
            covered.add(hidden)
        os.makedirs(path, mode=0o755, exist_ok=True)
        mount(f"/proc/self/fd/{descriptor}", path, None, MS_BIND | MS_REC)
        mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
        os.close(descriptor)
    os.mkdir(WORK_DIR, 0o700)
    return WORK_DIR


def write_files(work_dir, files, uid):
    for name, text in files.items():
        path = os.path.join(work_dir, name)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        if uid is not None:
            os.chown(path, uid, uid)
    if uid is not None:
        os.chown(work_dir, uid, uid)


def set_limits(spec):
    mib = 1 << 20
    cpu = max(1, int(spec["cpu_s"]))
    for kind, value in ((resource.RLIMIT_AS, spec["memory_mb"] * mib),
                        (resource.RLIMIT_CPU, cpu),
                        (resource.RLIMIT_FSIZE, spec["file_mb"] * mib),
                        (resource.RLIMIT_NPROC, spec["processes"]),
                        (resource.RLIMIT_NOFILE, 256),
                        (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(kind, (value, value))


def main():
    with open(sys.argv[1], encoding="utf-8") as handle:
        spec = json.load(handle)
    staging = os.path.dirname(sys.argv[1])
    try:
        files = {}
        for name in spec["files"]:
            with open(os.path.join(staging, name), encoding="utf-8") as handle:
                files[name] = handle.read()
        uid = spec["uid"] if spec["isolate"] else None
        if spec["isolate"]:
            work_dir = build_jail(spec)
        else:
            work_dir = os.path.join(staging, "work")
            os.mkdir(work_dir, 0o700)
        write_files(work_dir, files, uid)
        os.chdir(work_dir)
        set_limits(spec)
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
    except Exception as error:  # never run the candidate in a half-built jail
        print(f"{SETUP_FAILED}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        os._exit(125)
    environment = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work_dir,
                   "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1",
                   "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    try:
        os.execve(spec["python"], [spec["python"], "-I", spec["main"]], environment)
    except OSError as error:  # e.g. EAGAIN: the uid is over RLIMIT_NPROC already
        print(f"{SETUP_FAILED}: exec: {error}", file=sys.stderr, flush=True)
        os._exit(125)


if __name__ == "__main__":
    main()
