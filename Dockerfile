# A nanoshard node (or coordinator) in a container.
#
#   docker build -t nanoshard .                                   # CPU torch (default)
#   docker build -t nanoshard:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#   docker run --rm --network host nanoshard                       # = nanoshard-node join
#   docker run --rm --network host nanoshard join --coordinator 192.168.1.10:7960
#   docker run --rm --network host --entrypoint nanoshard nanoshard coordinator --model demo
#
# mDNS needs --network host: multicast does not cross Docker's default bridge. Without it,
# pass --coordinator HOST:PORT and publish the node's port (-p 7961:7961 ... join --port 7961).
ARG PYTHON=3.11
FROM python:${PYTHON}-slim

# CPU wheels by default; a CUDA build takes another index (see above).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/nanoshard
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

# The package: one import namespace over these folders (pyproject's package-dir).
COPY pyproject.toml README.md ./
COPY nanoshard ./nanoshard
COPY node ./node
COPY coordinator ./coordinator
COPY client ./client
COPY cli ./cli
COPY api ./api
RUN pip install . && useradd --create-home volunteer

USER volunteer
VOLUME ["/home/volunteer/.cache/nanoshard"]
EXPOSE 7960
ENTRYPOINT ["nanoshard-node"]
CMD ["join"]
