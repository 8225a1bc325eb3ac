# The MLflow tracking server image for infra/k8s/mlflow.yaml: MLflow's own image plus the PostgreSQL driver,
# boto3 (for S3 artifacts) and Flask-WTF (for basic-auth), at the versions the project pins. Build from the
# repository root:
#   docker build -f infra/docker/mlflow.Dockerfile -t clip-ray-mlflow:3.17.2 .
FROM ghcr.io/mlflow/mlflow:v3.17.2

# Flask-WTF: the basic-auth app (--app-name basic-auth) needs it for CSRF protection (mlflow[auth]).
RUN pip install --no-cache-dir psycopg2-binary==2.9.13 boto3==1.43.117 Flask-WTF==1.3.0
