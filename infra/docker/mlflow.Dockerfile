# The MLflow tracking server image for infra/k8s/mlflow.yaml: MLflow's own image plus the PostgreSQL driver
# and boto3 (for S3 artifacts), at the MLflow version the project pins. Build from the repository root:
#   docker build -f infra/docker/mlflow.Dockerfile -t clip-ray-mlflow:3.17.2 .
FROM ghcr.io/mlflow/mlflow:v3.17.2

RUN pip install --no-cache-dir psycopg2-binary==2.9.13 boto3==1.43.117
