import SwiftUI

struct ContentView: View {
    @EnvironmentObject private var controller: HeraldController

    var body: some View {
        if let user = controller.user {
            InboxView(user: user)
        } else {
            SignInView()
        }
    }
}

/// Stub sign-in: a real app signs the user in to its own backend instead.
struct SignInView: View {
    @EnvironmentObject private var controller: HeraldController
    // The simulator shares the Mac's loopback; on a device use the Mac's LAN address.
    @State private var gatewayUrl = SampleSettings.signIn?.gatewayUrl ?? "http://127.0.0.1:8080"
    @State private var backendUrl = SampleSettings.signIn?.backendUrl ?? "http://127.0.0.1:8090"
    @State private var user = SampleSettings.signIn?.user ?? "alice"

    var body: some View {
        Form {
            Section("Herald sample") {
                TextField("Gateway URL", text: $gatewayUrl)
                    .textInputAutocapitalization(.never)
                    .keyboardType(.URL)
                TextField("Sample backend URL", text: $backendUrl)
                    .textInputAutocapitalization(.never)
                    .keyboardType(.URL)
                TextField("User", text: $user)
                    .textInputAutocapitalization(.never)
            }
            Button("Sign in") {
                controller.signIn(SignIn(
                    gatewayUrl: gatewayUrl.trimmingCharacters(in: .whitespaces),
                    backendUrl: backendUrl.trimmingCharacters(in: .whitespaces),
                    user: user.trimmingCharacters(in: .whitespaces)
                ))
            }
            .disabled(user.isEmpty || gatewayUrl.isEmpty || backendUrl.isEmpty)
        }
    }
}

struct InboxView: View {
    @EnvironmentObject private var controller: HeraldController
    let user: String

    var body: some View {
        NavigationStack {
            List {
                Section {
                    Text("Device \(SampleSettings.deviceId)").font(.footnote)
                    if let status = controller.pushStatus {
                        Text(status).font(.footnote)
                    }
                    if let error = controller.lastError {
                        Text(error).font(.footnote).foregroundColor(.red)
                    }
                }
                Section("Messages") {
                    if controller.messages.isEmpty {
                        Text("No messages yet. Send one with curl (see README).")
                            .foregroundColor(.secondary)
                    }
                    ForEach(controller.messages) { message in
                        MessageRow(message: message)
                    }
                }
            }
            .refreshable { controller.refresh() }
            .navigationTitle(user)
            .toolbar {
                ToolbarItem(placement: .navigationBarTrailing) {
                    BadgeView(badge: controller.badge)
                }
                ToolbarItem(placement: .navigationBarLeading) {
                    Button("Sign out") { controller.signOut() }
                }
            }
        }
    }
}

struct BadgeView: View {
    let badge: Badge

    var body: some View {
        Text(badge.label)
            .font(.caption.bold())
            .foregroundColor(.white)
            .padding(.horizontal, 10)
            .padding(.vertical, 4)
            .background(Capsule().fill(color))
    }

    private var color: Color {
        switch badge.tone {
        case .good: return .green
        case .busy: return .orange
        case .idle: return .gray
        case .bad: return .red
        }
    }
}

struct MessageRow: View {
    let message: ReceivedMessage

    var body: some View {
        VStack(alignment: .leading, spacing: 2) {
            Text(message.title).font(.headline)
            if !message.body.isEmpty {
                Text(message.body).font(.body)
            }
            Text("#\(message.seq) · \(message.viaPush ? "push" : "live") · \(message.sentAt)")
                .font(.caption)
                .foregroundColor(.secondary)
        }
    }
}
