"""Library code behind the Prefect flow ``idlm-full`` (flows/idlm_full.py).

``pipeline``: the stage DAG from dvc.yaml; ``params``: profile/overrides into params.yaml
and the flow's own settings; ``lock``: one flow run per workspace; ``dvc_runner``: one
``dvc repro`` streamed line by line; ``record``/``run``: what MLflow gets; ``summary``:
the closing table. Nothing here imports prefect; mlflow only through ``idlm.tracking``.
"""
