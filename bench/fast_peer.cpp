// A fast stand-in RDP server for bench/run.py: speaks just enough ICP to
// shake hands, log one user on and answer the bridge's requests, in C++ so
// that the stand-in is never what limits the measurement (the Python one in
// bridge/rdp/standin.py costs about as much CPU per call as the bridge itself).
//
// The frames it sends first (handshake, LogonUser) are built by run.py with
// the generated protobuf classes and passed in hex. Answers are encoded here:
// RPCBase{tag, isResponse, status, msgType, payload} with a fixed payload per
// msgType, also from run.py; a msgType without one is answered NOTFOUND.
//
// usage: fast_peer SOCKET HANDSHAKE_HEX LOGON_HEX DELAY_SECONDS [MSGTYPE=PAYLOAD_HEX ...]
// prints "logged on" once the bridge answered LogonUser, then "answering".
#include <arpa/inet.h>
#include <errno.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <string>

static double now() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static std::string unhex(const char *hex) {
  std::string out;
  for (size_t i = 0; hex[i] && hex[i + 1]; i += 2) {
    char byte[3] = {hex[i], hex[i + 1], 0};
    out.push_back(static_cast<char>(strtoul(byte, nullptr, 16)));
  }
  return out;
}

static void put_varint(std::string &out, uint64_t value) {
  while (value >= 0x80) {
    out.push_back(static_cast<char>((value & 0x7f) | 0x80));
    value >>= 7;
  }
  out.push_back(static_cast<char>(value));
}

static bool get_varint(const std::string &in, size_t &pos, uint64_t &value) {
  value = 0;
  for (int shift = 0; shift < 64 && pos < in.size(); shift += 7) {
    uint8_t byte = static_cast<uint8_t>(in[pos++]);
    value |= static_cast<uint64_t>(byte & 0x7f) << shift;
    if (!(byte & 0x80)) return true;
  }
  return false;
}

struct Envelope {
  uint32_t tag = 0, msg_type = 0, status = 0;
  bool is_response = false;
};

// Reads the RPCBase fields we need and skips the rest by wire type.
static bool parse(const std::string &frame, Envelope &env) {
  size_t pos = 0;
  while (pos < frame.size()) {
    uint64_t key, value;
    if (!get_varint(frame, pos, key)) return false;
    switch (key & 7) {
      case 0:
        if (!get_varint(frame, pos, value)) return false;
        if ((key >> 3) == 1) env.tag = static_cast<uint32_t>(value);
        if ((key >> 3) == 2) env.is_response = value != 0;
        if ((key >> 3) == 3) env.status = static_cast<uint32_t>(value);
        if ((key >> 3) == 4) env.msg_type = static_cast<uint32_t>(value);
        break;
      case 1: pos += 8; break;
      case 2:
        if (!get_varint(frame, pos, value)) return false;
        pos += value;
        break;
      case 5: pos += 4; break;
      default: return false;
    }
  }
  return pos == frame.size();
}

static std::map<uint32_t, std::string> payloads;

static std::string answer(const Envelope &request) {
  auto found = payloads.find(request.msg_type);
  std::string body;
  body.push_back(0x08);
  put_varint(body, request.tag);
  body += "\x10\x01";
  body.push_back(0x18);
  put_varint(body, found == payloads.end() ? 2 : 0);  // SUCCESS or NOTFOUND
  body.push_back(0x20);
  put_varint(body, request.msg_type);
  if (found != payloads.end()) {
    body.push_back(0x2a);
    put_varint(body, found->second.size());
    body += found->second;
  }
  uint32_t n = htonl(static_cast<uint32_t>(body.size()));
  return std::string(reinterpret_cast<const char *>(&n), 4) + body;
}

int main(int argc, char **argv) {
  if (argc < 5) {
    fprintf(stderr, "usage: %s SOCKET HANDSHAKE_HEX LOGON_HEX DELAY [TYPE=HEX ...]\n", argv[0]);
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  double delay = atof(argv[4]);
  for (int i = 5; i < argc; ++i) {
    const char *eq = strchr(argv[i], '=');
    if (eq) payloads[static_cast<uint32_t>(strtoul(argv[i], nullptr, 10))] = unhex(eq + 1);
  }

  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  strncpy(addr.sun_path, argv[1], sizeof(addr.sun_path) - 1);
  if (connect(fd, reinterpret_cast<sockaddr *>(&addr), sizeof(addr)) != 0) {
    perror("connect");
    return 1;
  }
  std::string out = unhex(argv[2]);  // the handshake goes first
  const std::string logon = unhex(argv[3]);
  int stage = 0;  // 0: handshaking, 1: logging on, 2: answering

  int ep = epoll_create1(0);
  epoll_event ev{};
  ev.events = EPOLLIN | EPOLLOUT;
  ev.data.fd = fd;
  epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
  bool want_out = true;

  std::deque<std::pair<double, std::string>> held;  // answers waiting out the delay
  std::string in;
  char buf[65536];
  for (;;) {
    int timeout = -1;
    if (!held.empty()) {
      double wait = held.front().first - now();
      timeout = wait > 0 ? static_cast<int>(wait * 1000) + 1 : 0;
    }
    epoll_event events[1];
    int n = epoll_wait(ep, events, 1, timeout);
    if (n < 0 && errno != EINTR) break;
    while (!held.empty() && held.front().first <= now()) {
      out += held.front().second;
      held.pop_front();
    }
    if (n > 0 && (events[0].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) {
      ssize_t got;
      while ((got = read(fd, buf, sizeof(buf))) > 0) in.append(buf, got);
      if (got == 0 || (got < 0 && errno != EAGAIN)) {
        printf("the bridge closed the connection\n");
        return 0;
      }
      size_t pos = 0;
      while (in.size() - pos >= 4) {
        uint32_t length;
        memcpy(&length, in.data() + pos, 4);
        length = ntohl(length);
        if (in.size() - pos - 4 < length) break;
        std::string frame = in.substr(pos + 4, length);
        pos += 4 + length;
        Envelope env;
        if (!parse(frame, env)) {
          fprintf(stderr, "unparseable frame from the bridge\n");
          return 1;
        }
        if (!env.is_response) {
          if (delay > 0) held.emplace_back(now() + delay, answer(env));
          else out += answer(env);
        } else if (env.status != 0) {
          fprintf(stderr, "the bridge answered status %u to msgType %u\n", env.status,
                  env.msg_type);
          return 1;
        } else if (stage == 0) {
          stage = 1;
          out += logon;
        } else if (stage == 1) {
          stage = 2;
          printf("logged on\nanswering\n");
          fflush(stdout);
        }
      }
      in.erase(0, pos);
    }
    while (!out.empty()) {
      ssize_t sent = write(fd, out.data(), out.size());
      if (sent <= 0) break;
      out.erase(0, sent);
    }
    if (out.empty() == want_out) {
      want_out = !out.empty();
      ev.events = EPOLLIN | (want_out ? static_cast<uint32_t>(EPOLLOUT) : 0u);
      epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
    }
  }
  return 0;
}
