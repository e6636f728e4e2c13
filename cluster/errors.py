"""Errors by cause. The client's (`SpecshardError`: bad input or environment, one
sentence a person can act on; the CLI exits 2, the API answers 400) and the cluster's
(`ClusterError`: the API answers 500, or 503 with Retry-After for `ClusterUnavailable`,
which a client may retry)."""


class SpecshardError(Exception):
    """A failure caused by input or environment, explained in one sentence."""


class InvalidForward(SpecshardError):
    """A forward request that does not fit a stage's state; nothing was changed."""


class ClusterError(Exception):
    """The cluster failed a request that was valid: not the client's fault (HTTP 500)."""


class ClusterUnavailable(ClusterError):
    """The ring is down or being rebuilt; the same request may succeed later (HTTP 503)."""
