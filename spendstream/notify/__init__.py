"""``spendstream notify``: threshold and break-even alerts and enforcement changes, delivered to
HTTP endpoints as signed webhooks (Standard Webhooks), at least once.

* :mod:`~spendstream.notify.signing`: the headers, :func:`sign` and :func:`verify` (standard
  library only: receivers can use it alone);
* :mod:`~spendstream.notify.records`: a record of the alerts or enforcement topic to the
  notification sent for it (body, ``webhook-id``), and the dead letter's shape;
* :mod:`~spendstream.notify.routing`: which endpoints a notification goes to, checked at start;
* :mod:`~spendstream.notify.delivery`: one attempt, what its answer means, the retry policy;
* :mod:`~spendstream.notify.service`: one consumer group per endpoint, the commit protocol;
* :mod:`~spendstream.notify.receiver`: a local receiver that verifies and counts (the demo).
"""

from spendstream.notify.signing import WebhookVerificationError, sign, verify

__all__ = ["WebhookVerificationError", "sign", "verify"]
