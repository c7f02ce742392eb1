// Load generator for bench/run.py: many non-blocking TCP connections on one
// epoll loop, each sending one pre-encoded framed Thrift CALL at a time and
// checking every reply (a REPLY frame with the expected seqid and, for
// virtualChannelOpen, a non-empty pipeName). C++ so that the client is never
// what limits the measurement.
//
// usage: loadgen HOST PORT REQUEST_HEX MODE CONNECTIONS SECONDS_OR_CALLS [WARMUP_CALLS]
//   MODE latency:   CONNECTIONS closed loops, stop after SECONDS_OR_CALLS calls in all
//   MODE duration:  CONNECTIONS closed loops for SECONDS_OR_CALLS seconds (after warmup)
//   MODE inflight:  open CONNECTIONS, send one call on each, wait for every reply
// prints one JSON object: calls, errors, seconds, p50_us, p99_us, max_us, cpu_s
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static double now() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

struct Conn {
  int fd = -1;
  std::string in;
  size_t sent = 0;
  bool busy = false;
  uint32_t seqid = 0;
  double started = 0;
};

static std::string request_template;
static bool expect_pipe = false;

static std::string request_for(uint32_t seqid) {
  // Template is a framed CALL; the seqid sits right after the method name.
  std::string r = request_template;
  uint32_t name_len = ntohl(*reinterpret_cast<const uint32_t *>(r.data() + 8));
  uint32_t net = htonl(seqid);
  memcpy(&r[12 + name_len], &net, 4);
  return r;
}

static bool reply_ok(const std::string &frame, uint32_t seqid) {
  // frame: i32 version|type, string name, i32 seqid, result struct
  if (frame.size() < 12) return false;
  uint32_t word = ntohl(*reinterpret_cast<const uint32_t *>(frame.data()));
  if ((word & 0xff) != 2) return false;  // REPLY
  uint32_t name_len = ntohl(*reinterpret_cast<const uint32_t *>(frame.data() + 4));
  size_t off = 8 + name_len;
  if (frame.size() < off + 4) return false;
  if (ntohl(*reinterpret_cast<const uint32_t *>(frame.data() + off)) != seqid) return false;
  if (!expect_pipe) return true;
  // success (field 0, struct) -> pipeName (field 1, string) with length > 0
  off += 4;
  if (frame.size() < off + 3 + 3 + 4) return false;
  if (frame[off] != 12 || frame[off + 1] != 0 || frame[off + 2] != 0) return false;
  off += 3;
  if (frame[off] != 11 || frame[off + 1] != 0 || frame[off + 2] != 1) return false;
  off += 3;
  return ntohl(*reinterpret_cast<const uint32_t *>(frame.data() + off)) > 0;
}

int main(int argc, char **argv) {
  if (argc < 7) {
    fprintf(stderr, "usage: loadgen HOST PORT REQUEST_HEX MODE CONNECTIONS N [WARMUP]\n");
    return 2;
  }
  const char *host = argv[1];
  int port = atoi(argv[2]);
  std::string hex = argv[3];
  for (size_t i = 0; i + 1 < hex.size(); i += 2)
    request_template.push_back(static_cast<char>(strtol(hex.substr(i, 2).c_str(), nullptr, 16)));
  expect_pipe = request_template.find("virtualChannelOpen") != std::string::npos;
  std::string mode = argv[4];
  int nconn = atoi(argv[5]);
  double amount = atof(argv[6]);
  long warmup = argc > 7 ? atol(argv[7]) : 0;

  rlimit rl;
  getrlimit(RLIMIT_NOFILE, &rl);
  rl.rlim_cur = rl.rlim_max;
  setrlimit(RLIMIT_NOFILE, &rl);

  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  inet_pton(AF_INET, host, &addr.sin_addr);
  int ep = epoll_create1(0);
  std::vector<Conn> conns(nconn);
  // Connect in batches so the server's accept queue never overflows.
  for (int i = 0; i < nconn; i++) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, reinterpret_cast<sockaddr *>(&addr), sizeof addr) != 0) {
      fprintf(stderr, "connect %d: %s\n", i, strerror(errno));
      return 1;
    }
    fcntl(fd, F_SETFL, O_NONBLOCK);
    conns[i].fd = fd;
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u32 = i;
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
  }

  std::vector<double> latencies;
  latencies.reserve(1 << 20);
  long calls = 0, errors = 0, outstanding = 0;
  uint32_t next_seqid = 1;
  bool measuring = warmup == 0;
  long warm_done = 0;
  double t0 = now(), deadline = 0;
  if (mode == "duration" && measuring) deadline = t0 + amount;

  auto send = [&](Conn &c) {
    c.seqid = next_seqid++;
    std::string r = request_for(c.seqid);
    c.started = now();
    c.busy = true;
    outstanding++;
    size_t off = 0;
    while (off < r.size()) {
      ssize_t n = write(c.fd, r.data() + off, r.size() - off);
      if (n < 0) {
        if (errno == EAGAIN) continue;
        errors++;
        return;
      }
      off += n;
    }
  };

  for (auto &c : conns) send(c);
  bool stopping = false;
  std::vector<epoll_event> events(1024);
  char buf[65536];
  while (outstanding > 0) {
    int n = epoll_wait(ep, events.data(), events.size(), 30000);
    if (n == 0) {
      fprintf(stderr, "timeout waiting for %ld replies\n", outstanding);
      errors += outstanding;
      break;
    }
    for (int e = 0; e < n; e++) {
      Conn &c = conns[events[e].data.u32];
      ssize_t got = read(c.fd, buf, sizeof buf);
      if (got <= 0) {
        if (got < 0 && errno == EAGAIN) continue;
        errors++;
        epoll_ctl(ep, EPOLL_CTL_DEL, c.fd, nullptr);
        if (c.busy) outstanding--;
        c.busy = false;
        continue;
      }
      c.in.append(buf, got);
      while (c.in.size() >= 4) {
        uint32_t len = ntohl(*reinterpret_cast<const uint32_t *>(c.in.data()));
        if (c.in.size() < 4 + len) break;
        std::string frame = c.in.substr(4, len);
        c.in.erase(0, 4 + len);
        double t = now();
        c.busy = false;
        outstanding--;
        if (!reply_ok(frame, c.seqid)) errors++;
        if (measuring) {
          calls++;
          latencies.push_back((t - c.started) * 1e6);
        } else if (++warm_done >= warmup) {
          measuring = true;
          t0 = now();
          if (mode == "duration") deadline = t0 + amount;
        }
        if (mode == "inflight") continue;
        if (mode == "latency" && calls + outstanding >= static_cast<long>(amount)) stopping = true;
        if (mode == "duration" && measuring && t >= deadline) stopping = true;
        if (!stopping) send(c);
      }
    }
  }
  double seconds = now() - t0;
  std::sort(latencies.begin(), latencies.end());
  auto pct = [&](double p) {
    if (latencies.empty()) return 0.0;
    return latencies[std::min(latencies.size() - 1, static_cast<size_t>(p * latencies.size()))];
  };
  rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec * 1e-6 + ru.ru_stime.tv_sec +
               ru.ru_stime.tv_usec * 1e-6;
  printf("{\"calls\": %ld, \"errors\": %ld, \"seconds\": %.4f, \"p50_us\": %.1f, "
         "\"p99_us\": %.1f, \"max_us\": %.1f, \"cpu_s\": %.3f}\n",
         calls, errors, seconds, pct(0.5), pct(0.99), latencies.empty() ? 0 : latencies.back(),
         cpu);
  for (auto &c : conns) close(c.fd);
  return errors ? 1 : 0;
}
