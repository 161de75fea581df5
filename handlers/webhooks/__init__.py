"""The webhook sender: task outcomes POSTed to their ``webhook_url``, signed, guarded, retried.

The modules, in the order a delivery flows through them:

* ``config``: :class:`WebhookConfig`, the sender's settings (built from ``Settings`` in ``ops``).
* ``payload``: the body of a delivery (Standard Webhooks' envelope, whole or thin).
* ``signing``: the Standard Webhooks headers and signatures (and :func:`verify` for receivers).
* ``ssrf``: the resolver that vets every address before a connection is made.
* ``policy``: what an attempt's result means, and whether and when to try again.
* ``settlement``: that decision as the record the store writes.
* ``sender``: :class:`WebhookSender`, the loops that read, deliver and settle.
* ``admin``: operator actions (list dead deliveries, send one again).

Everything Redis (names, scripts, calls) is in ``streams/webhook_store.py`` and
``streams/webhook_dead.py``.
"""

from sop_llm.handlers.webhooks.admin import (
    Redelivery,
    WebhookAdmin,
    WebhookBusyError,
    WebhookNotFoundError,
)
from sop_llm.handlers.webhooks.config import CONSUMER_PREFIX, DEFAULT_SCHEDULE_S, WebhookConfig
from sop_llm.handlers.webhooks.sender import WebhookSender
from sop_llm.handlers.webhooks.signing import SignatureError, Signer, verify

__all__ = [
    "CONSUMER_PREFIX",
    "DEFAULT_SCHEDULE_S",
    "Redelivery",
    "SignatureError",
    "Signer",
    "WebhookAdmin",
    "WebhookBusyError",
    "WebhookConfig",
    "WebhookNotFoundError",
    "WebhookSender",
    "verify",
]
