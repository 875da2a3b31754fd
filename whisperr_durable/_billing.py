"""Event names the Whisperr spec reserves for membership billing."""

from __future__ import annotations


class BillingEvent:
    """Reserved billing event names, to send from a backend with ``track()``.

    Money properties, where they apply: ``plan_id``, ``price`` (number, major units),
    ``currency`` (ISO 4217, upper case), ``plan_period`` (ISO 8601, e.g. ``P1M``),
    ``transaction_id``, ``store``.
    """

    TRIAL_STARTED = "trial_started"
    TRIAL_CONVERTED = "trial_converted"
    TRIAL_AUTO_RENEW_DISABLED = "trial_auto_renew_disabled"
    MEMBERSHIP_STARTED = "membership_started"
    RENEWAL_SUCCEEDED = "renewal_succeeded"
    AUTO_RENEW_DISABLED = "auto_renew_disabled"
    AUTO_RENEW_ENABLED = "auto_renew_enabled"
    MEMBERSHIP_ENDED = "membership_ended"
    BILLING_ISSUE_STARTED = "billing_issue_started"
    BILLING_RECOVERED = "billing_recovered"
    REFUND_GRANTED = "refund_granted"
