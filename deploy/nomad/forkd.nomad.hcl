# One forkd daemon on every Nomad client (a system job). The daemons find each
# other through etcd and move snapshots through the OCI registry below.
#
#   nomad var put nomad/jobs/forkd token=@./api-token cluster_token=@./cluster-token tls_crt=@./server.crt tls_key=@./server.key
#     (tokens: >= 16 random bytes each, the same on every node; clients present `token`, the nodes `cluster_token` to each other)
#   nomad job run -var 'etcd=etcd://10.0.0.5:2379' -var 'registry=oci://registry.local/forkd' deploy/nomad/forkd.nomad.hcl
#
# forkd runs QEMU per sandbox under per-sandbox uids and makes cgroups, network
# namespaces and nftables rules on the host, so the task runs with raw_exec (the
# client must enable the plugin: plugin "raw_exec" { config { enabled = true } }),
# as root, with forkd installed on the host (scripts/setup.sh, or the .deb/tarball
# your fleet uses). /dev/kvm is used where the host has it, TCG where it does not.

variable "etcd" {
  type        = string
  description = "etcd client endpoints, etcd://HOST:PORT[,HOST:PORT...]"
}

variable "registry" {
  type        = string
  description = "the OCI registry snapshots travel through, oci://HOST[:PORT]/REPO"
}

variable "forkd_bin" {
  type        = string
  default     = "/usr/local/bin/forkd"
  description = "where forkd is installed on every client"
}

job "forkd" {
  type        = "system"
  datacenters = ["*"]

  # One host at a time: its sandboxes stop with its daemon.
  update {
    max_parallel = 1
    stagger      = "30s"
  }

  group "forkd" {
    network {
      port "api" {
        static = 7070
      }
    }

    service {
      name     = "forkd"
      port     = "api"
      provider = "nomad"

      check {
        type     = "http"
        protocol = "https"
        path     = "/healthz"
        interval = "10s"
        timeout  = "2s"
        tls_skip_verify = true
      }
    }

    task "daemon" {
      driver = "raw_exec"

      # On SIGTERM the daemon gives up its etcd lease (placement skips it) and stops its sandboxes.
      kill_timeout = "60s"
      kill_signal  = "SIGTERM"

      config {
        command = var.forkd_bin
        args = [
          "daemon",
          "--cluster", var.etcd,
          "--registry", var.registry,
          "--node-name", "${node.unique.name}",
          "--advertise-url", "https://${NOMAD_IP_api}:${NOMAD_PORT_api}",
          "--cluster-token-file", "${NOMAD_SECRETS_DIR}/cluster-token",
          "--listen", "0.0.0.0:${NOMAD_PORT_api}",
          "--tls-cert", "${NOMAD_SECRETS_DIR}/tls.crt",
          "--tls-key", "${NOMAD_SECRETS_DIR}/tls.key",
          "--token-file", "${NOMAD_SECRETS_DIR}/token",
        ]
      }

      env {
        FORKD_HOME    = "/var/lib/forkd"
        FORKD_RUN_DIR = "/run/forkd"
        FORKD_SHM_DIR = "/dev/shm/forkd"
      }

      template {
        destination = "${NOMAD_SECRETS_DIR}/token"
        perms       = "0400"
        data        = "{{ with nomadVar \"nomad/jobs/forkd\" }}{{ .token }}{{ end }}"
      }

      template {
        destination = "${NOMAD_SECRETS_DIR}/cluster-token"
        perms       = "0400"
        data        = "{{ with nomadVar \"nomad/jobs/forkd\" }}{{ .cluster_token }}{{ end }}"
      }

      template {
        destination = "${NOMAD_SECRETS_DIR}/tls.crt"
        perms       = "0400"
        data        = "{{ with nomadVar \"nomad/jobs/forkd\" }}{{ .tls_crt }}{{ end }}"
      }

      template {
        destination = "${NOMAD_SECRETS_DIR}/tls.key"
        perms       = "0400"
        data        = "{{ with nomadVar \"nomad/jobs/forkd\" }}{{ .tls_key }}{{ end }}"
      }

      resources {
        cpu    = 500
        memory = 512
      }
    }
  }
}
