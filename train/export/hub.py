"""Upload a merged model or GGUF files to the Hugging Face Hub (`--push-to-hub REPO`).

The token is read from HF_TOKEN (or HUGGING_FACE_HUB_TOKEN) in the environment and handed to
huggingface_hub only: it is never logged, echoed, or written into a saved file. HF_ENDPOINT picks
another Hub (a private mirror), as huggingface_hub itself reads it. The Hub is probed before any long work
(train.core.hub): an upload that cannot happen fails at once, saying whether HF_HUB_OFFLINE was the user's or
the probe found the Hub (endpoint shown without credentials) unreachable.
"""

from __future__ import annotations

import os
from pathlib import Path

from train.core.errors import UserError
from train.core.log import get_logger

log = get_logger("hub")
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def hub_token() -> str:
    """The write token, once the Hub is known to be reachable: called before any long work, and again at upload."""
    token = next((os.environ[v] for v in TOKEN_VARIABLES if os.environ.get(v)), None)
    if not token:
        raise UserError(
            "--push-to-hub needs a write token in HF_TOKEN (environment only; it is never printed or saved)"
        )
    require_hub()
    return token


def require_hub() -> None:
    """Refuse an upload that cannot happen, saying why: the user's HF_HUB_OFFLINE, or our probe's finding."""
    import huggingface_hub.constants as hub_constants

    from train.core.hub import hub_unreachable, offline_unless_hub_reachable

    found = hub_unreachable()
    if found is None and hub_constants.HF_HUB_OFFLINE:
        raise UserError(
            f"--push-to-hub with HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '1')} in your environment: "
            "unset HF_HUB_OFFLINE to upload"
        )
    if found is None and offline_unless_hub_reachable():
        return
    found = found or hub_unreachable() or "the Hub was unreachable when probed"
    raise UserError(
        f"--push-to-hub: {found}, so nothing can be uploaded (HF_HUB_OFFLINE=1 here is this run's own fallback "
        "to the local cache, not a setting of yours): check the network, HF_ENDPOINT, and HTTPS_PROXY / NO_PROXY "
        "(the proxy must reach the Hub), then run the command again"
    )


def push_folder(
    folder: str | Path,
    repo_id: str,
    allow_patterns: list[str] | None = None,
    private: bool = True,
    message: str = "Upload from stage-trainer",
) -> str:
    """Create `repo_id` if needed (private unless told otherwise) and upload `folder`; returns the commit URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    # The endpoint is read here, not at import: huggingface_hub fixes its default when first imported.
    api = HfApi(token=hub_token(), endpoint=os.environ.get("HF_ENDPOINT") or None)
    try:
        api.create_repo(repo_id, exist_ok=True, private=private)
        commit = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, allow_patterns=allow_patterns, commit_message=message
        )
    except HfHubHTTPError as err:
        # huggingface_hub's messages name the URL and status, never the token.
        raise UserError(f"upload of {folder} to {repo_id} failed: {str(err).splitlines()[0]}") from None
    log.info("uploaded %s to %s (%s)", folder, repo_id, commit.commit_url)
    return commit.commit_url
