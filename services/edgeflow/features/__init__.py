"""The features service: Feast entity features plus request-time pair features."""
