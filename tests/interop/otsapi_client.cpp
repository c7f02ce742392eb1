// An OTS API client on Apache Thrift's C++ library, as ogon's WTSAPI
// provider is: TSocket or TSSLSocket, TFramedTransport (or TBufferedTransport
// to provoke the mismatch), TBinaryProtocol. It calls all fourteen methods
// and prints one "name: value" line each, for tests/interop/test_cpp_client.py.
//
// usage: otsapi_client HOST PORT framed|buffered plain|tls CAFILE USER PASSWORD SESSION
#include <cstdlib>
#include <iostream>
#include <memory>
#include <string>

#include <thrift/protocol/TBinaryProtocol.h>
#include <thrift/transport/TBufferTransports.h>
#include <thrift/transport/TSSLSocket.h>
#include <thrift/transport/TSocket.h>

#include "otsapi.h"

using namespace apache::thrift;
using namespace apache::thrift::protocol;
using namespace apache::thrift::transport;
using ogon::otsapi::otsapiClient;

int main(int argc, char **argv) {
  if (argc != 9) {
    std::cerr << "usage: otsapi_client HOST PORT framed|buffered plain|tls CAFILE USER "
                 "PASSWORD SESSION\n";
    return 2;
  }
  const std::string host = argv[1];
  const int port = std::atoi(argv[2]);
  const bool framed = std::string(argv[3]) == "framed";
  const bool tls = std::string(argv[4]) == "tls";
  const std::string user = argv[6], password = argv[7];
  const int session = std::atoi(argv[8]);

  std::shared_ptr<TSocket> socket;
  std::shared_ptr<TSSLSocketFactory> factory;
  if (tls) {
    factory = std::make_shared<TSSLSocketFactory>();
    factory->loadTrustedCertificates(argv[5]);
    factory->authenticate(true);
    socket = factory->createSocket(host, port);
  } else {
    socket = std::make_shared<TSocket>(host, port);
  }
  socket->setRecvTimeout(20000);
  std::shared_ptr<TTransport> transport;
  if (framed) {
    transport = std::make_shared<TFramedTransport>(socket);
  } else {
    transport = std::make_shared<TBufferedTransport>(socket);
  }
  otsapiClient client(std::make_shared<TBinaryProtocol>(transport));
  try {
    transport->open();
    ogon::otsapi::TVersion mine, theirs;
    mine.__set_VersionMajor(1);
    mine.__set_VersionMinor(1);
    client.getVersionInfo(theirs, mine);
    std::cout << "getVersionInfo: " << theirs.VersionMajor << "." << theirs.VersionMinor << "\n";
    std::cout << "ping: " << client.ping(4711) << "\n";

    ogon::otsapi::TReturnLogonConnection logon;
    client.logonConnection(logon, user, password, "");
    std::cout << "logonConnection: " << logon.success << "\n";
    const std::string token = logon.authToken;
    std::cout << "getPermissionForToken: " << client.getPermissionForToken(token) << "\n";

    ogon::otsapi::TReturnEnumerateSession sessions;
    client.enumerateSessions(sessions, token, 1);
    std::cout << "enumerateSessions: " << sessions.returnValue << " "
              << sessions.sessionInfoList.size() << "\n";

    ogon::otsapi::TReturnQuerySessionInformation info;
    client.querySessionInformation(info, token, session, 5);
    std::cout << "querySessionInformation.UserName: " << info.infoValue.stringValue << "\n";
    client.querySessionInformation(info, token, session, 15);
    std::cout << "querySessionInformation.ClientDisplay: " << info.infoValue.displayValue.displayWidth
              << "x" << info.infoValue.displayValue.displayHeight << "\n";
    client.querySessionInformation(info, token, session, 24);
    std::cout << "querySessionInformation.SessionInfo: " << info.infoValue.WTSINFO.SessionId
              << " " << info.infoValue.WTSINFO.UserName << "\n";

    ogon::otsapi::TReturnVirtualChannelOpen channel;
    client.virtualChannelOpen(channel, token, session, "CLIPRDR", false, 0);
    std::cout << "virtualChannelOpen: " << channel.pipeName << " " << channel.instance << "\n";
    std::cout << "virtualChannelClose: "
              << client.virtualChannelClose(token, session, "CLIPRDR", channel.instance) << "\n";
    std::cout << "sendMessage: " << client.sendMessage(token, session, "t", "m", 0, 5, true)
              << "\n";
    std::cout << "startRemoteControlSession: "
              << client.startRemoteControlSession(token, session, session, 0, 0, 0) << "\n";
    std::cout << "stopRemoteControlSession: "
              << client.stopRemoteControlSession(token, session, session) << "\n";
    std::cout << "disconnectSession: " << client.disconnectSession(token, session, true) << "\n";
    std::cout << "logoffSession: " << client.logoffSession(token, session, true) << "\n";
    std::cout << "logoffConnection: " << client.logoffConnection(token) << "\n";
    transport->close();
  } catch (const TException &e) {
    std::cout << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
