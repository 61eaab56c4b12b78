import Foundation
import Herald

/// One row of the message list.
struct ReceivedMessage: Identifiable, Equatable {
    let seq: Int64
    let id: String
    let title: String
    let body: String
    let sentAt: String
    let viaPush: Bool

    /// The notification text if the message has one, else its `data` (`text` if present).
    init(_ message: HeraldMessage, viaPush: Bool) {
        let data = message.dataJson.data(using: .utf8)
            .flatMap { try? JSONSerialization.jsonObject(with: $0) as? [String: Any] }
        let text = data?["text"] as? String
        seq = message.seq
        id = message.id
        title = message.notification?.title ?? text ?? "Message \(message.seq)"
        body = message.notification?.body ?? (text == nil ? message.dataJson : "")
        sentAt = message.sentAt
        self.viaPush = viaPush
    }
}
