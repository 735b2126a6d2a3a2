// libnezha_grpc: a gRPC server transport and a load client over gRPC's asynchronous (completion queue)
// API with generic (bytes in, bytes out) methods; include/nezha/nezha_grpc.h has the contract. The
// completion-queue API rather than the callback API: with it our one thread polls the sockets itself and
// runs each event, where the callback API of gRPC 1.51 hands every event from a polling thread to an executor
// thread (measured on the demo server, one client: ~170 us of CPU per call in those two threads, against
// ~95 us in ours; ~35 us at 16 clients, where one wake-up serves several calls).
#include "nezha/nezha_grpc.h"

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/alarm.h>
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
#include <random>
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
  nezha_grpc_server(int max_calls, double read_timeout) : max_calls(max_calls), read_timeout(read_timeout) {}

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
  const double read_timeout;                    // seconds for a call's request to arrive
  std::mutex mutex;
  std::condition_variable idle;                 // notified when no call waits for an answer
  std::condition_variable ended;                // notified when the last Call object is deleted
  std::unordered_map<uint64_t, Call*> waiting;  // every call given to or waiting for the embedder
  std::deque<uint64_t> queue;                   // the ids not yet taken by nezha_grpc_next
  std::string handed, handed_method;            // the last call nezha_grpc_next gave out: its bytes
  uint64_t next_id = 1;
  size_t live = 0;                              // Call objects, the one waiting for a call included
  size_t in_flight = 0;                         // calls arrived and not yet ended: what max_calls bounds
  bool stopping = false;
};

namespace {

// One call: wait for it, read its one request (within read_timeout), hand it to the embedder, write what it
// answers, then delete itself once gRPC has reported the answer sent and no read or timer event is still to
// come (each has its own tag). Every event runs on the poller thread; answer() may also run on the
// embedder's thread, once, after the read ended.
class Call final : public Event {
 public:
  explicit Call(nezha_grpc_server* server) : server_(server), stream_(&context_) {
    {
      std::lock_guard<std::mutex> lock(server_->mutex);
      ++server_->live;
    }
    server_->service.RequestCall(&context_, &stream_, server_->queue_events.get(), server_->queue_events.get(), this);
  }

  ~Call() override {
    std::lock_guard<std::mutex> lock(server_->mutex);
    server_->in_flight -= counted_;
    if (--server_->live == 0) server_->ended.notify_all();
  }

  void proceed(bool ok) override {
    switch (step_) {
      case Step::kArrive:
        if (!ok) return delete this;                 // the server is shutting down
        new Call(server_);                           // the next call's wait
        step_ = Step::kRead;
        if (!admit()) {                              // over the limit: answered before its request is read
          const std::string why = "more than " + std::to_string(server_->max_calls) + " calls in flight; retry later";
          return answer(grpc::StatusCode::RESOURCE_EXHAUSTED, why.c_str(), nullptr, 0);
        }
        timing_ = reading_ = true;
        alarm_.Set(server_->queue_events.get(), std::chrono::system_clock::now() +
                   std::chrono::duration_cast<std::chrono::system_clock::duration>(
                       std::chrono::duration<double>(server_->read_timeout)), &timer_);
        return stream_.Read(&message_, &reader_);
      case Step::kRead:                              // not an event of this tag: reads and the timer have their own
      case Step::kAnswered:                          // the answer is sent (or the call is gone)
        finished_ = true;
        return end_if_done();
    }
  }

  void read_ended(bool ok) {
    reading_ = false;
    if (timing_) alarm_.Cancel();                    // its event still comes (ok false if it had not fired)
    if (timed_out_) return end_if_done();            // the timer answered first
    if (!ok) return answer(grpc::StatusCode::INVALID_ARGUMENT, "the call sent no request message", nullptr, 0);
    request = flatten(message_);
    message_.Clear();
    server_->arrive(this);                           // may answer this call
  }

  void timer_ended(bool fired) {
    timing_ = false;
    if (fired && reading_) {                         // no request yet: answered now (the pending read then fails)
      timed_out_ = true;
      char why[96];
      std::snprintf(why, sizeof why, "the request message did not arrive within %g s", server_->read_timeout);
      return answer(grpc::StatusCode::DEADLINE_EXCEEDED, why, nullptr, 0);
    }
    end_if_done();
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
  struct Hook final : Event {                        // a tag of its own for one kind of this call's events
    Hook(Call* call, void (Call::*ended)(bool)) : call(call), ended(ended) {}
    void proceed(bool ok) override { (call->*ended)(ok); }
    Call* call;
    void (Call::*ended)(bool);
  };

  void end_if_done() {                               // the answer sent, no read or timer event to come
    if (finished_ && !reading_ && !timing_) delete this;
  }

  bool admit() {
    std::lock_guard<std::mutex> lock(server_->mutex);
    if (server_->in_flight >= server_->max_calls) return false;
    ++server_->in_flight;
    counted_ = 1;
    return true;
  }

  enum class Step { kArrive, kRead, kAnswered };
  nezha_grpc_server* server_;
  grpc::GenericServerContext context_;
  grpc::GenericServerAsyncReaderWriter stream_;
  grpc::ByteBuffer message_, response_;
  grpc::Alarm alarm_;
  Hook timer_{this, &Call::timer_ended};
  Hook reader_{this, &Call::read_ended};
  Step step_ = Step::kArrive;
  size_t counted_ = 0;                               // 1 while it counts in in_flight
  bool timing_ = false, reading_ = false, timed_out_ = false, finished_ = false;   // poller thread only
};

}  // namespace

void nezha_grpc_server::arrive(Call* call) {
  std::unique_lock<std::mutex> lock(mutex);
  if (stopping) {
    lock.unlock();
    return call->answer(grpc::StatusCode::UNAVAILABLE, "the server is shutting down", nullptr, 0);
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

nezha_grpc_server* nezha_grpc_start(const char* address, int32_t max_message_bytes, int32_t max_calls,
                                    double read_timeout_seconds, char* error, size_t error_size) {
  if (address == nullptr || max_message_bytes <= 0 || max_calls <= 0 || !(read_timeout_seconds > 0)) {
    tell(error, error_size, "an address, a positive message size limit, call limit and read timeout are needed");
    return nullptr;
  }
  try {
    auto server = std::make_unique<nezha_grpc_server>(max_calls, read_timeout_seconds);
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
    Call* call = found->second;
    server->handed = std::move(call->request);    // ours, not the call's: nezha_grpc_stop may end the call
    server->handed_method = call->method();
    *id = next;
    *method = server->handed_method.data();
    *method_size = server->handed_method.size();
    *request = reinterpret_cast<const uint8_t*>(server->handed.data());
    *request_size = server->handed.size();
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
  server->server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));   // cancels the rest
  {
    // every call object ends on the poller thread (its last events need the queue open), then the queue
    std::unique_lock<std::mutex> lock(server->mutex);
    server->ended.wait(lock, [server] { return server->live == 0; });
  }
  server->queue_events->Shutdown();
  server->poller.join();
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
    struct Resume final : Event {                    // a paused client's alarm: its next call
      void proceed(bool) override { fire(); }
      std::function<void()> fire;
    };
    struct Client final : Event {
      void proceed(bool) override { done(this); }
      std::function<void(Client*)> done;
      grpc::Alarm pause;
      Resume resume;
      std::unique_ptr<grpc::ClientContext> context;
      std::unique_ptr<grpc::GenericClientAsyncResponseReader> call;
      grpc::ByteBuffer response;
      grpc::Status status;
      Clock::time_point sent;
      size_t next = 0;
      int64_t counts[kCodes] = {};
    };
    std::vector<Client> clients(concurrency);
    const auto start = Clock::now();
    const auto stop = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(duration_seconds));
    const auto timeout = std::chrono::duration_cast<std::chrono::system_clock::duration>(
        std::chrono::duration<double>(timeout_seconds));
    const std::string name(method);
    int running = concurrency;
    size_t ok_count = 0;
    std::mt19937_64 random(12345);
    auto keep = [&](double latency) {                 // all of them, or a uniform sample (reservoir)
      if (ok_count < latencies_capacity) {
        latencies[ok_count] = latency;
      } else {
        const size_t slot = std::uniform_int_distribution<size_t>(0, ok_count)(random);
        if (slot < latencies_capacity) latencies[slot] = latency;
      }
      ++ok_count;
    };
    auto send = [&](Client* client) {
      client->context = std::make_unique<grpc::ClientContext>();
      client->context->set_deadline(std::chrono::system_clock::now() + timeout);
      client->sent = Clock::now();
      client->call = stub.PrepareUnaryCall(client->context.get(), name, requests[client->next++ % count], &events);
      client->call->StartCall();
      client->call->Finish(&client->response, &client->status, client);
    };
    auto next_or_end = [&](Client* client) {
      if (Clock::now() < stop) return send(client);
      if (--running == 0) events.Shutdown();
    };
    for (int c = 0; c < concurrency; ++c) {
      Client& client = clients[c];
      client.next = offset + static_cast<size_t>(c) * 7919;
      client.done = [&](Client* done) {
        const auto now = Clock::now();
        const int code = done->status.error_code();
        done->counts[code < kCodes ? code : grpc::StatusCode::UNKNOWN]++;
        if (done->status.ok()) keep(std::chrono::duration<double>(now - done->sent).count());
        if (code == grpc::StatusCode::UNAVAILABLE && now < stop) {   // the server is gone or draining: pause
          return done->pause.Set(&events, std::chrono::system_clock::now() + std::chrono::milliseconds(10), &done->resume);
        }
        next_or_end(done);
      };
      client.resume.fire = [&, paused = &client] { next_or_end(paused); };
      send(&client);
    }
    void* tag;
    bool ok;
    while (events.Next(&tag, &ok)) static_cast<Event*>(tag)->proceed(ok);
    *seconds = std::chrono::duration<double>(Clock::now() - start).count();
    for (int code = 0; code < kCodes; ++code) status_counts[code] = 0;
    for (const Client& client : clients) {
      for (int code = 0; code < kCodes; ++code) status_counts[code] += client.counts[code];
    }
    *latencies_count = ok_count;
    return 0;
  } catch (const std::exception& e) {
    tell(error, error_size, e.what());
    return 1;
  }
}

}  // extern "C"
