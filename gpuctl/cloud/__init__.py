"""Cloud providers behind one Protocol: ``surf`` (the real API) and ``static`` (fixed hosts).

``make_provider`` picks one from the config. Provider modules are imported only when chosen,
so the CLI starts without loading httpx for a static fleet and vice versa.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpuctl.cloud.base import CloudProvider
    from gpuctl.config import Config
    from gpuctl.credentials import Credentials

__all__ = ["make_provider"]


def make_provider(config: Config, credentials: Credentials) -> CloudProvider:
    """The provider ``config.cloud_api.provider`` names.

    ``surf`` needs the SURF API token (``CredentialsError``, exit 4, listing where it looked
    when there is none); ``static`` needs no secret at all.
    """
    api = config.cloud_api
    if api.provider == "static":
        from gpuctl.cloud.static import StaticProvider

        return StaticProvider(api.hosts)
    from gpuctl.cloud.surf import SurfProvider

    token = credentials.require("api_token")
    # The CSRF token goes with the API token: a server given its token in the environment or
    # a file is not made to open the OS keyring for the optional companion (and log it).
    csrf = credentials.find("csrf_token", keyring=token.source.startswith("OS keyring"))
    return SurfProvider(
        api.base_url,
        token.value,
        csrf_token=csrf.value if csrf else None,
        name_filter=api.machine_name_filter,
        token_source=token.source,
    )
