"""ci-gateway: the authenticating sidecar for APIs behind Entra ID and Azure API Management."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ci-gateway")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
