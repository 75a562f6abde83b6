"""A stand-in for the HTTP front-end in tests (``ServeConfig.frontend_module``): rank 0 starts it as it
would start the server; it connects to the coordinator's link with the key from its environment and
relays that link to a test, which finds where to connect (address, key, the arguments this process
got) in the file named by ``DEJAVU_TEST_RELAY_FILE``."""
from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

from dejavu_py.comm.local_link import Link, LinkServer, address_from_env, connect


def main(argv: list[str]) -> None:
    args = dict(zip(argv[::2], argv[1::2]))
    up = connect(address_from_env(args["--link"]), timeout_s=60)
    lock, early, test = threading.Lock(), [], []  # what the coordinator said before the test connected

    def down(msg: object) -> None:
        with lock:
            if test:
                test[0].send(msg)
            else:
                early.append(msg)

    def joined(link: Link) -> None:
        with lock:
            for msg in early:
                link.send(msg)
            test.append(link)
        link.start_reading(up.send, lambda: None, "relay-up")

    server = LinkServer(joined)
    done = threading.Event()
    up.start_reading(down, done.set, "relay-down")
    path = Path(os.environ["DEJAVU_TEST_RELAY_FILE"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"host": server.address.host, "port": server.address.port,
                               "key": server.address.key_hex, "args": args}))
    os.replace(tmp, path)
    done.wait()  # the coordinator's side closed: serving is over


if __name__ == "__main__":
    main(sys.argv[1:])
