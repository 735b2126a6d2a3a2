// libnezha_grpc: a gRPC server transport and a load client over gRPC's asynchronous (completion queue)
// API with generic (bytes in, bytes out) methods; include/nezha/nezha_grpc.h has the contract. The
// completion-queue API rather than the callback API: with it our one thread polls the sockets itself and
// runs each event, where the callback API of gRPC 1.51 hands every event from a polling thread to an executor
// thread (measured on the demo server, one client: ~170 us of CPU per call in those two threads, against
// ~95 us in ours; ~35 us at 16 clients, where one wake-up serves several calls).
#include "nezha/nezha_grpc.h"

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
constexpr int kCodes = 17;  // gRPC status codes 0 (OK) .. 16 (UNAUTHENTICATED)

void tell(char* error, size_t size, const std::string& text) {
  if (error != nullptr && size > 0) std::snprintf(error, size, "%s", text.c_str());
}

std::string flatten(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!buffer.Dump(&slices).ok()) return out;
  out.reserve(buffer.Length());
  for (const auto& s : slices) out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

struct Event {  // what a completion-queue tag points at
  virtual ~Event() = default;
  virtual void proceed(bool ok) = 0;
};

class Call;

}  // namespace

struct nezha_grpc_server {
  explicit nezha_grpc_server(int max_calls) : max_calls(max_calls) {}

  void arrive(Call* call);
  Call* take(uint64_t id);                 // the call waiting for its answer, now no longer waiting
  void wake() const {
    const uint64_t one = 1;
    if (::write(fd, &one, sizeof one) < 0) { /* the counter is full: already readable */ }
  }
  void drain_fd() const {
    uint64_t count;
    if (::read(fd, &count, sizeof count) < 0) { /* EAGAIN: it was not readable */ }
  }

  grpc::AsyncGenericService service;
  std::unique_ptr<grpc::ServerCompletionQueue> queue_events;
  std::unique_ptr<grpc::Server> server;
  std::thread poller;                           // runs every event of queue_events
  int fd = -1;
  const size_t max_calls;
  std::mutex mutex;
  std::condition_variable idle;                 // notified when no call waits for an answer
  std::unordered_map<uint64_t, Call*> waiting;  // every call given to or waiting for the embedder
  std::deque<uint64_t> queue;                   // the ids not yet taken by nezha_grpc_next
  uint64_t next_id = 1;
  bool stopping = false;
};

namespace {

// One call: wait for it, read its one request, hand it to the embedder, write what it answers, then delete
// itself when gRPC reports the answer sent. Each step is one operation on the queue; the next waits for it.
class Call final : public Event {
 public:
  explicit Call(nezha_grpc_server* server) : server_(server), stream_(&context_) {
    server_->service.RequestCall(&context_, &stream_, server_->queue_events.get(), server_->queue_events.get(), this);
  }

  void proceed(bool ok) override {
    switch (step_) {
      case Step::kArrive:
        if (!ok) return delete this;                 // the server is shutting down
        new Call(server_);                           // the next call's wait
        step_ = Step::kRead;
        return stream_.Read(&message_, this);
      case Step::kRead:
        if (!ok) return answer(grpc::StatusCode::CANCELLED, "the call ended before its request arrived", nullptr, 0);
        request = flatten(message_);
        message_.Clear();
        return server_->arrive(this);                // may answer (and so end) this call: nothing after it
      case Step::kAnswered:
        return delete this;
    }
  }

  void answer(int code, const char* message, const uint8_t* data, size_t size) {
    step_ = Step::kAnswered;
    if (code == 0) {
      grpc::Slice slice(data, size);
      response_ = grpc::ByteBuffer(&slice, 1);
      return stream_.WriteAndFinish(response_, grpc::WriteOptions(), grpc::Status::OK, this);
    }
    if (code < 0 || code >= kCodes) code = grpc::StatusCode::INTERNAL;
    stream_.Finish(grpc::Status(static_cast<grpc::StatusCode>(code), message != nullptr ? message : ""), this);
  }

  const std::string& method() const { return context_.method(); }

  double seconds_left() const {
    const auto deadline = context_.deadline();
    const auto now = std::chrono::system_clock::now();
    if (deadline - now > std::chrono::hours(24 * 365)) return -1.0;   // gRPC's "no deadline" is the far future
    return std::chrono::duration<double>(deadline - now).count();
  }

  std::string request;

 private:
  enum class Step { kArrive, kRead, kAnswered };
  nezha_grpc_server* server_;
  grpc::GenericServerContext context_;
  grpc::GenericServerAsyncReaderWriter stream_;
  grpc::ByteBuffer message_, response_;
  Step step_ = Step::kArrive;
};

}  // namespace

void nezha_grpc_server::arrive(Call* call) {
  std::unique_lock<std::mutex> lock(mutex);
  if (stopping) {
    lock.unlock();
    return call->answer(grpc::StatusCode::UNAVAILABLE, "the server is shutting down", nullptr, 0);
  }
  if (waiting.size() >= max_calls) {
    lock.unlock();
    const std::string why = "more than " + std::to_string(max_calls) + " calls in flight; retry later";
    return call->answer(grpc::StatusCode::RESOURCE_EXHAUSTED, why.c_str(), nullptr, 0);
  }
  const uint64_t id = next_id++;
  waiting.emplace(id, call);
  queue.push_back(id);
  if (queue.size() == 1) wake();
}

Call* nezha_grpc_server::take(uint64_t id) {
  std::lock_guard<std::mutex> lock(mutex);
  auto found = waiting.find(id);
  if (found == waiting.end()) return nullptr;
  Call* call = found->second;
  waiting.erase(found);
  if (waiting.empty()) idle.notify_all();
  return call;
}

extern "C" {

nezha_grpc_server* nezha_grpc_start(const char* address, int32_t max_message_bytes, int32_t max_calls, char* error,
                                    size_t error_size) {
  if (address == nullptr || max_message_bytes <= 0 || max_calls <= 0) {
    tell(error, error_size, "an address, a positive message size limit and a positive call limit are needed");
    return nullptr;
  }
  try {
    auto server = std::make_unique<nezha_grpc_server>(max_calls);
    server->fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (server->fd < 0) {
      tell(error, error_size, "no eventfd for the call queue");
      return nullptr;
    }
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &port);
    builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);   // a port another server holds is an error
    builder.SetMaxReceiveMessageSize(max_message_bytes);
    builder.RegisterAsyncGenericService(&server->service);
    server->queue_events = builder.AddCompletionQueue();
    server->server = builder.BuildAndStart();
    if (!server->server || port == 0) {
      ::close(server->fd);
      server->server.reset();
      server->queue_events->Shutdown();
      void* tag;
      bool ok;
      while (server->queue_events->Next(&tag, &ok)) {}
      tell(error, error_size, std::string("cannot listen on ") + address + " (the port is taken or the address is not valid)");
      return nullptr;
    }
    new Call(server.get());                                    // the first call's wait
    server->poller = std::thread([events = server->queue_events.get()] {
      pthread_setname_np(pthread_self(), "nezha-grpc");       // named, for per-thread CPU (bench/protocol_cost.py)
      void* tag;
      bool ok;
      while (events->Next(&tag, &ok)) static_cast<Event*>(tag)->proceed(ok);
    });
    return server.release();
  } catch (const std::exception& e) {
    tell(error, error_size, e.what());
    return nullptr;
  }
}

int nezha_grpc_fd(nezha_grpc_server* server) { return server->fd; }

int nezha_grpc_next(nezha_grpc_server* server, uint64_t* id, const char** method, size_t* method_size,
                    const uint8_t** request, size_t* request_size, double* seconds_left) {
  std::lock_guard<std::mutex> lock(server->mutex);
  while (!server->queue.empty()) {
    const uint64_t next = server->queue.front();
    server->queue.pop_front();
    auto found = server->waiting.find(next);
    if (found == server->waiting.end()) continue;   // answered meanwhile (nezha_grpc_stop)
    const Call* call = found->second;
    *id = next;
    *method = call->method().data();
    *method_size = call->method().size();
    *request = reinterpret_cast<const uint8_t*>(call->request.data());
    *request_size = call->request.size();
    *seconds_left = call->seconds_left();
    return 1;
  }
  server->drain_fd();                    // under the lock: a call that arrives now writes it again
  return 0;
}

int nezha_grpc_finish(nezha_grpc_server* server, uint64_t id, int code, const char* message, const uint8_t* response,
                      size_t response_size) {
  Call* call = server->take(id);
  if (call == nullptr) return 1;
  call->answer(code, message, response, response_size);
  return 0;
}

void nezha_grpc_stop(nezha_grpc_server* server, double grace_seconds) {
  std::vector<Call*> late;
  {
    std::unique_lock<std::mutex> lock(server->mutex);
    server->stopping = true;
    server->idle.wait_for(lock, std::chrono::duration<double>(grace_seconds > 0 ? grace_seconds : 0),
                          [server] { return server->waiting.empty(); });
    for (auto& [id, call] : server->waiting) late.push_back(call);
    server->waiting.clear();
    server->queue.clear();
  }
  for (Call* call : late) call->answer(grpc::StatusCode::UNAVAILABLE, "the server stopped before answering", nullptr, 0);
  server->server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  server->queue_events->Shutdown();                            // after the server's, as gRPC requires
  server->poller.join();                                       // it ran every call's last event
}

void nezha_grpc_free(nezha_grpc_server* server) {
  if (server == nullptr) return;
  server->server.reset();
  ::close(server->fd);
  delete server;
}

int nezha_grpc_load(const char* address, const char* method, const uint8_t* const* bodies, const size_t* sizes,
                    size_t count, int concurrency, double duration_seconds, size_t offset, double timeout_seconds,
                    double* latencies, size_t latencies_capacity, size_t* latencies_count, int64_t* status_counts,
                    double* seconds, char* error, size_t error_size) {
  if (address == nullptr || method == nullptr || count == 0 || concurrency <= 0) {
    tell(error, error_size, "an address, a method, at least one body and a positive concurrency are needed");
    return 1;
  }
  try {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_ENABLE_RETRIES, 0);          // as the Python client: a load test never retries
    args.SetMaxReceiveMessageSize(-1);
    auto channel = grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
    grpc::GenericStub stub(channel);
    std::vector<grpc::ByteBuffer> requests;
    requests.reserve(count);
    for (size_t i = 0; i < count; ++i) {
      grpc::Slice slice(bodies[i], sizes[i]);
      requests.emplace_back(&slice, 1);
    }
    // every event of the run on this thread: an answer in, the client's next call out
    grpc::CompletionQueue events;
    struct Client final : Event {
      void proceed(bool) override { done(this); }
      std::function<void(Client*)> done;
      std::unique_ptr<grpc::ClientContext> context;
      std::unique_ptr<grpc::GenericClientAsyncResponseReader> call;
      grpc::ByteBuffer response;
      grpc::Status status;
      Clock::time_point sent;
      size_t next = 0;
      std::vector<double> latencies;
      int64_t counts[kCodes] = {};
    };
    std::vector<Client> clients(concurrency);
    const auto start = Clock::now();
    const auto stop = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(duration_seconds));
    const auto timeout = std::chrono::duration_cast<std::chrono::system_clock::duration>(
        std::chrono::duration<double>(timeout_seconds));
    const std::string name(method);
    int running = concurrency;
    auto send = [&](Client* client) {
      client->context = std::make_unique<grpc::ClientContext>();
      client->context->set_deadline(std::chrono::system_clock::now() + timeout);
      client->sent = Clock::now();
      client->call = stub.PrepareUnaryCall(client->context.get(), name, requests[client->next++ % count], &events);
      client->call->StartCall();
      client->call->Finish(&client->response, &client->status, client);
    };
    for (int c = 0; c < concurrency; ++c) {
      Client& client = clients[c];
      client.next = offset + static_cast<size_t>(c) * 7919;
      client.done = [&](Client* done) {
        const auto now = Clock::now();
        const int code = done->status.error_code();
        done->counts[code < kCodes ? code : grpc::StatusCode::UNKNOWN]++;
        if (done->status.ok()) done->latencies.push_back(std::chrono::duration<double>(now - done->sent).count());
        if (now < stop) return send(done);
        if (--running == 0) events.Shutdown();
      };
      send(&client);
    }
    void* tag;
    bool ok;
    while (events.Next(&tag, &ok)) static_cast<Event*>(tag)->proceed(ok);
    *seconds = std::chrono::duration<double>(Clock::now() - start).count();
    size_t n = 0;
    for (int code = 0; code < kCodes; ++code) status_counts[code] = 0;
    for (const Client& client : clients) {
      for (double latency : client.latencies) {
        if (n < latencies_capacity) latencies[n] = latency;
        ++n;
      }
      for (int code = 0; code < kCodes; ++code) status_counts[code] += client.counts[code];
    }
    *latencies_count = n;
    return 0;
  } catch (const std::exception& e) {
    tell(error, error_size, e.what());
    return 1;
  }
}

}  // extern "C"
