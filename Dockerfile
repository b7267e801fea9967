# A nanoshard node (or coordinator) in a container.
#
#   docker build -t nanoshard .                                   # CPU torch (default)
#   docker build -t nanoshard:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#   docker run --rm --network host nanoshard                       # = nanoshard-node join
#   docker run --rm --network host nanoshard join --coordinator 192.168.1.10:7960
#   docker run --rm --network host --entrypoint nanoshard nanoshard coordinator --model demo
#
# A node needs --network host: multicast (mDNS) does not cross Docker's default bridge, and
# on a bridge a node would give the swarm its container's address, which no other machine
# reaches. A coordinator alone may run on a bridge: publish its port (-p 7960:7960).
# The built-in demo model needs nothing more; a nanoGPT ckpt.pt needs GPT-2's BPE files
# (`make gpt2-bpe` in a checkout): mount them and point NANOSHARD_GPT2_BPE_DIR at them.
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
# The cache (weights, the node's key) is a volume: its folder must exist, the volunteer's,
# or Docker makes it root's and the node cannot write its key there.
RUN pip install . && useradd --create-home volunteer \
    && mkdir -p /home/volunteer/.cache/nanoshard && chown -R volunteer: /home/volunteer/.cache

USER volunteer
VOLUME ["/home/volunteer/.cache/nanoshard"]
EXPOSE 7960
ENTRYPOINT ["nanoshard-node"]
CMD ["join"]
