"""The `gate` stage: the load test (guidellm) of ISD and R-ISD against AR, the
decision and the promotion."""
