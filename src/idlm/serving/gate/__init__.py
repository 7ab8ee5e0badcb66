"""The gate's pieces: the load test (guidellm) of ISD and R-ISD against AR and the
decision. The stage that runs them and promotes is `idlm.stages.gate`."""
