"""Code every node shares: GGUF inspection, stage cutting, planning, the CLI."""

import os

# gRPC's fork handlers restart its poller in a forked child; when the child is about to
# exec (subprocess with a preexec_fn, as Ray starts its own processes) Popen has closed
# the poller's epoll fd and the child can die before its exec ("epoll_wait error: Bad
# file descriptor", grpc/grpc#43055: ~1 spawn in 100 here with grpcio 1.85). Nothing
# here forks to keep using gRPC, so the handlers are off. Read when grpc is imported:
# coordinator/ and worker/ import this package first.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
